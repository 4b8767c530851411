"""Builds libloldu.so with SwiftPM and ships it inside the package.

``pip install ./bindings/python`` (or ``pip wheel``) runs ``swift build`` in the repository this
folder belongs to — the same command as ``make build``, so an existing build is reused — and
copies the library next to the package's modules, where ``import loldu`` finds it with no
environment variable. ``LOLDU_PREBUILT=/path/to/libloldu.so`` ships a library built elsewhere
instead. An editable install (``pip install -e``) builds nothing: the package then uses the
checkout's ``.build/release/libloldu.so`` (``make build``).

An sdist (``python -m build``, which then builds the wheel from the unpacked sdist) carries the
Swift package it needs in ``swift/`` (``SWIFT_PACKAGE``: the manifest, the sources with their
module maps, the header and the test target the manifest declares), and is built from that copy,
away from the repository.

The metadata is in ``pyproject.toml``; this file only adds the build step.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.dist import Distribution

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIBRARY = "libloldu.so"
# What `swift build` needs of the repository: Package.swift and every target it declares
# (Sources/C* hold the module maps; CLoLDU's points at include/loldu.h), relative to its root.
SWIFT_PACKAGE = ("Package.swift", "Sources", "include", "Tests/LoLDUTests")
SDIST_SWIFT = HERE / "swift"  # where an sdist carries them

NO_TOOLCHAIN = """\
loldu: building libloldu.so needs a Swift toolchain (Swift 6 or newer: https://www.swift.org/install/linux/)
and the Debian/Ubuntu packages it links against:
    apt-get install -y pkg-config libopenblas-dev liblapacke-dev libdnnl-dev
Or build the library elsewhere and install with LOLDU_PREBUILT=/path/to/libloldu.so pip install ...
"""


def swift_package() -> pathlib.Path:
    """The Swift package to build: the copy an sdist carries, else the repository this folder
    belongs to."""
    for root in (SDIST_SWIFT, REPO):
        if (root / "Package.swift").is_file():
            return root
    raise SystemExit(f"loldu: found no Package.swift in {SDIST_SWIFT} (an sdist's copy of the Swift package) nor in "
                     f"{REPO}: install from a checkout of the repository (pip install ./bindings/python) or from an "
                     "sdist made from one, or set LOLDU_PREBUILT to a built libloldu.so")


def soname() -> str:
    """The library's SONAME, as the Makefile links it (``SONAME``: libloldu.so.MAJOR, or
    libloldu.so.0.MINOR while the major version is 0), so that a build here does not relink
    the checkout's library without it."""
    namespace: dict = {}
    exec((HERE / "loldu" / "_version.py").read_text(), namespace)
    major, minor, _ = namespace["__version__"].split(".")
    return f"libloldu.so.{major}.{minor}" if major == "0" else f"libloldu.so.{major}"


def build_library() -> pathlib.Path:
    """The libloldu.so to ship: LOLDU_PREBUILT, or a fresh SwiftPM build of ``swift_package()``."""
    prebuilt = os.environ.get("LOLDU_PREBUILT")
    if prebuilt:
        path = pathlib.Path(prebuilt).expanduser()
        if not path.is_file():
            raise SystemExit(f"loldu: LOLDU_PREBUILT={prebuilt} is not a file")
        return path
    root = swift_package()
    swift = shutil.which("swift")
    if swift is None:
        raise SystemExit(NO_TOOLCHAIN)
    command = [swift, "build", "-c", "release", "--product", "loldu", "-Xswiftc", "-static-stdlib",
               "-Xlinker", f"--version-script={root / 'Sources' / 'LoLDUCAPI' / 'exports.map'}",
               "-Xlinker", f"-soname={soname()}"]
    print(f"loldu: building libloldu.so in {root}:", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=root)
    if result.returncode != 0:
        raise SystemExit(f"loldu: `swift build` failed (exit {result.returncode}); see its output above.\n" + NO_TOOLCHAIN)
    return root / ".build" / "release" / LIBRARY


class BuildPy(build_py):
    """build_py, then the library copied into the built package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = pathlib.Path(self.build_lib) / "loldu" / LIBRARY
        shutil.copy2(build_library(), target)


class SwiftSdist(sdist):
    """sdist, with the Swift package (``SWIFT_PACKAGE``) copied into it as ``swift/``."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        root = swift_package()
        for name in SWIFT_PACKAGE:
            source, target = root / name, pathlib.Path(base_dir) / "swift" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*"))
            else:
                shutil.copy2(source, target)


class BinaryDistribution(Distribution):
    """The wheel holds a native library, so it is tagged for this platform."""

    def has_ext_modules(self):
        return True


commands = {"build_py": BuildPy, "sdist": SwiftSdist}
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
