"""Builds libloldu.so with SwiftPM and ships it inside the package.

``pip install ./bindings/python`` (or ``pip wheel``) runs ``swift build`` in the repository this
folder belongs to — the same command as ``make build``, so an existing build is reused — and
copies the library next to the package's modules, where ``import loldu`` finds it with no
environment variable. ``LOLDU_PREBUILT=/path/to/libloldu.so`` ships a library built elsewhere
instead. An editable install (``pip install -e``) builds nothing: the package then uses the
checkout's ``.build/release/libloldu.so`` (``make build``).

The metadata is in ``pyproject.toml``; this file only adds the build step.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIBRARY = "libloldu.so"

NO_TOOLCHAIN = """\
loldu: building libloldu.so needs a Swift toolchain (Swift 6 or newer: https://www.swift.org/install/linux/)
and the Debian/Ubuntu packages it links against:
    apt-get install -y pkg-config libopenblas-dev liblapacke-dev libdnnl-dev
Or build the library elsewhere and install with LOLDU_PREBUILT=/path/to/libloldu.so pip install ...
"""


def build_library() -> pathlib.Path:
    """The libloldu.so to ship: LOLDU_PREBUILT, or a fresh SwiftPM build of this checkout."""
    prebuilt = os.environ.get("LOLDU_PREBUILT")
    if prebuilt:
        path = pathlib.Path(prebuilt).expanduser()
        if not path.is_file():
            raise SystemExit(f"loldu: LOLDU_PREBUILT={prebuilt} is not a file")
        return path
    if not (REPO / "Package.swift").is_file():
        raise SystemExit(f"loldu: {REPO} holds no Package.swift: install from a checkout of the repository "
                         "(pip install ./bindings/python), or set LOLDU_PREBUILT to a built libloldu.so")
    swift = shutil.which("swift")
    if swift is None:
        raise SystemExit(NO_TOOLCHAIN)
    command = [swift, "build", "-c", "release", "--product", "loldu", "-Xswiftc", "-static-stdlib",
               "-Xlinker", f"--version-script={REPO / 'Sources' / 'LoLDUCAPI' / 'exports.map'}"]
    print("loldu: building libloldu.so:", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"loldu: `swift build` failed (exit {result.returncode}); see its output above.\n" + NO_TOOLCHAIN)
    return REPO / ".build" / "release" / LIBRARY


class BuildPy(build_py):
    """build_py, then the library copied into the built package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = pathlib.Path(self.build_lib) / "loldu" / LIBRARY
        shutil.copy2(build_library(), target)


class BinaryDistribution(Distribution):
    """The wheel holds a native library, so it is tagged for this platform."""

    def has_ext_modules(self):
        return True


commands = {"build_py": BuildPy}
try:  # setuptools >= 70.1; older ones take bdist_wheel from the wheel package
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:
        bdist_wheel = None
if bdist_wheel is not None:
    class PlatformWheel(bdist_wheel):
        """py3-none-<platform>: the library is loaded with ctypes, so any Python 3 on this platform."""

        def get_tag(self):
            _, _, platform = super().get_tag()
            return "py3", "none", platform

    commands["bdist_wheel"] = PlatformWheel

setup(cmdclass=commands, distclass=BinaryDistribution)
