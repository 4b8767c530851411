"""torch.distributed DDP, gloo backend, 2 processes on CPU: after several steps z and σ are
identical on both ranks and equal a single-process run on the combined batch, with torch.optim
and with the library's optimiser."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from conftest import PACKAGE_ROOT, TESTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_a_single_process(tmp_path):
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]),
    )
    workers = [
        subprocess.Popen([sys.executable, str(TESTS / "ddp_worker.py"), str(tmp_path)],
                         env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    outputs = []
    try:
        for w in workers:
            outputs.append(w.communicate(timeout=180))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-4000:]
    results = np.load(tmp_path / "ddp.npz")
    for variant in ("torch_adamw", "loldu_adamw"):
        rank0, rank1, single = (results[f"{variant}.{k}"] for k in ("rank0", "rank1", "single"))
        assert rank0.shape == (2 * 33,)
        np.testing.assert_array_equal(rank0, rank1)  # identical on both ranks
        np.testing.assert_allclose(rank0, single, rtol=1e-5, atol=1e-6)  # = one process, whole batch
        assert results[f"{variant}.moved"] > 1e-2  # training really changed z
    np.testing.assert_allclose(results["torch_adamw.single"], results["loldu_adamw.single"], rtol=1e-5, atol=1e-6)
