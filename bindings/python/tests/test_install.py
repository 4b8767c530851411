"""`pip install ./bindings/python` as a user runs it: into a fresh virtual environment, with the
library built by SwiftPM and shipped inside the package, importable with no environment
variable; a wheel tagged for the platform; an sdist that builds on its own (`python -m build`);
a clear message when no Swift toolchain is found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import loldu
from conftest import PACKAGE_ROOT


def clean_environment(**extra) -> dict:
    """The caller's environment without anything that points at the library or the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOLDU_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def make_venv(path) -> str:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True, timeout=300)
    return str(path / "bin" / "python")


def test_pip_install_ships_the_library_and_imports_with_no_environment_variable(tmp_path):
    python = make_venv(tmp_path / "venv")
    install = subprocess.run([python, "-m", "pip", "install", "-q", str(PACKAGE_ROOT)], env=clean_environment(),
                             capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stdout + install.stderr
    probe = subprocess.run([python, "-c", "import loldu; print(loldu.library_path); print(loldu.library_version())"],
                           env=clean_environment(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    path, version = probe.stdout.split()
    assert path.startswith(str(tmp_path / "venv")) and path.endswith("site-packages/loldu/libloldu.so")
    assert version == loldu.HEADER_VERSION


def test_a_wheel_is_tagged_for_the_platform_and_holds_the_library(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(PACKAGE_ROOT)],
                           env=clean_environment(), capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    assert wheel.startswith(f"loldu-{loldu.HEADER_VERSION}-py3-none-linux_x86_64"), wheel
    assert "loldu/libloldu.so" in zipfile.ZipFile(tmp_path / wheel).namelist()


def test_an_sdist_builds_its_wheel_away_from_the_checkout(tmp_path):
    """`python -m build`'s two steps (without its isolated environment for the first): the sdist,
    then a wheel from the unpacked sdist outside the repository, which compiles the sdist's own
    copy of the Swift package (a clean build: about half a minute) into a working library."""
    made = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
                          cwd=PACKAGE_ROOT, env=clean_environment(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    with tarfile.open(tmp_path / made.stdout.split()[-1]) as archive:
        archive.extractall(tmp_path / "unpacked")
    (source,) = (tmp_path / "unpacked").iterdir()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheels"),
                            str(source)], env=clean_environment(), capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (source / "swift" / ".build" / "release" / "libloldu.so").is_file()  # built from the sdist's sources
    (wheel,) = os.listdir(tmp_path / "wheels")
    library = zipfile.ZipFile(tmp_path / "wheels" / wheel).extract("loldu/libloldu.so", tmp_path / "wheel")
    probe = subprocess.run([sys.executable, "-c", "import loldu; print(loldu.library_version())"],
                           env=clean_environment(LOLDU_LIBRARY=library), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip() == loldu.HEADER_VERSION, probe.stdout + probe.stderr


def test_without_a_swift_toolchain_the_error_says_what_to_install(tmp_path):
    python = make_venv(tmp_path / "venv")
    swift = shutil.which("swift")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not swift or os.path.dirname(swift) != p)
    install = subprocess.run([python, "-m", "pip", "install", str(PACKAGE_ROOT)], env=clean_environment(PATH=path),
                             capture_output=True, text=True, timeout=1200)
    assert install.returncode != 0
    assert "needs a Swift toolchain" in install.stdout + install.stderr
    assert "libopenblas-dev" in install.stdout + install.stderr
