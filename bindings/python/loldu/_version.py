"""Version of the binding and of the C header it was written against.

``__version__`` must equal ``LOLDU_VERSION_STRING`` in ``include/loldu.h`` (a test checks it;
``pyproject.toml`` reads it from here). At import, the loaded library must have the same major
and minor version: the structs passed to it carry their size, and a library of another minor
version may reject them.
"""

__version__ = "0.2.0"
HEADER_VERSION = __version__
