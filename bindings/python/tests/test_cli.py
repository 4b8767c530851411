"""The `loldu` command-line tool, run as a user runs it: a binary, its output and exit codes.

The binary is $LOLDU_CLI (set by `make test-python`), else the checkout's build/bin/loldu."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import loldu
from conftest import REPO, minilm_dir

CLI = pathlib.Path(os.environ.get("LOLDU_CLI", REPO / "build" / "bin" / "loldu"))


# The trained MiniLM checkpoint adapts the word embeddings too: export-lora needs to be told.
EMBEDDING = ("--embedding", "embeddings.word_embeddings")


def run(*args, check_code: int | None = 0, **kwargs) -> subprocess.CompletedProcess:
    assert CLI.is_file(), f"{CLI} is missing: build it with `make build`"
    result = subprocess.run([str(CLI), *map(str, args)], **{"capture_output": True, "text": True, "timeout": 300, **kwargs})
    if check_code is not None:
        assert result.returncode == check_code, (result.returncode, result.stdout, result.stderr)
    return result


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(str(pathlib.Path(directory) / name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_version_help_and_usage_errors():
    assert run("--version").stdout.strip() == f"loldu {loldu.HEADER_VERSION}"
    assert "takes no arguments" in run("--version", "extra", check_code=2).stderr
    assert "export-lora" in run("--help").stdout
    for command in ("inspect", "verify", "export-lora", "merge"):
        assert run(command, "--help").stdout.startswith(f"usage: loldu {command}")
        # help wins over whatever else is wrong on the line, unless it is an option's value
        assert run(command, "--frob", "-h").stdout.startswith(f"usage: loldu {command}")
    assert 'cannot read the checkpoint "x"' in run("verify", "x", "--base", "--help", check_code=1).stderr
    assert "usage:" in run(check_code=2).stderr
    bad = run("frobnicate", check_code=2)
    assert 'unknown command "frobnicate"' in bad.stderr and "loldu --help" in bad.stderr
    missing = run("merge", "ckpt", "--out", "x", check_code=2)
    assert "merge: --base is required" in missing.stderr and "loldu merge --help" in missing.stderr
    assert "unknown option --frob" in run("inspect", "x", "--frob", check_code=2).stderr
    assert "--dtype must be f32, f16 or bf16" in run("merge", "c", "--base", "b", "--out", "o", "--dtype", "int8",
                                                     check_code=2).stderr
    assert "ADAPTER must not be empty" in run("inspect", "", check_code=2).stderr
    assert "--base needs a non-empty value" in run("merge", "c", "--base", "", "--out", "o", check_code=2).stderr
    assert "--out \"..\" must name the new directory" in run("merge", "c", "--base", "b", "--out", "..",
                                                            check_code=2).stderr
    assert "--help takes no value" in run("inspect", "x", "--help=x", check_code=2).stderr
    assert "help takes one command" in run("help", "frob", check_code=2).stderr
    # A name that is not UTF-8 is refused, never changed into another name.
    raw = subprocess.run([str(CLI), "inspect", b"ck\xff"], capture_output=True, timeout=60)
    assert raw.returncode == 2 and b"argument 2 is not valid UTF-8" in raw.stderr


def test_a_failed_write_to_standard_output_is_a_failure(tmp_path):
    weight = np.random.default_rng(0).standard_normal((6, 5))
    adapter = loldu.Adapter(weight, rank=4)
    adapter.z[:] = [1e308, 1e308, 1e308, -1e300]  # float64 values whose sum overflows
    loldu.save(tmp_path / "ckpt", {"layer": adapter})
    report = json.loads(run("inspect", tmp_path / "ckpt", "--json").stdout)["layers"][0]["z"]
    assert report["max"] == 1e308 and report["mean"] == pytest.approx(0.75e308 - 0.25e300, rel=1e-12)
    assert "1e+308" in run("inspect", tmp_path / "ckpt").stdout
    adapter.z[:] = 2.2e-45  # below float32's normal range: printed as float64
    loldu.save(tmp_path / "small", {"layer": adapter})
    assert "2.2e-45" in run("inspect", tmp_path / "small").stdout
    with open("/dev/full", "w") as full:
        failed = run("inspect", tmp_path / "ckpt", stdout=full, stderr=subprocess.PIPE, capture_output=False, check_code=1)
    assert "cannot write to standard output: No space left on device" in failed.stderr
    closed = run("inspect", tmp_path / "ckpt", stdout=None, capture_output=False, stderr=subprocess.PIPE,
                 preexec_fn=lambda: os.close(1), check_code=1)
    assert "standard output: it is closed" in closed.stderr


def test_inspect_reports_what_the_checkpoint_holds(trained_minilm):
    checkpoint, _ = trained_minilm
    report = json.loads(run("inspect", checkpoint, "--json").stdout)
    saved = loldu.Checkpoint(checkpoint)
    assert [layer["name"] for layer in report["layers"]] == saved.names
    assert report["library_version"] == loldu.HEADER_VERSION
    assert report["bytes"] == sum(os.path.getsize(checkpoint / f) for f in (loldu.MODEL_FILE, loldu.CONFIG_FILE))
    for layer in report["layers"]:
        values = saved.values(layer["name"])
        assert layer["sigma"] == values["sigma"]
        assert layer["z"]["mean"] == pytest.approx(values["z"].mean(), rel=1e-12)
        assert layer["z"]["max"] == values["z"].max()
        assert layer["weight_fingerprint"] == values["weight_fingerprint"]
        assert layer["rank"] == (4 if "embeddings" in layer["name"] else 8)
    text = run("inspect", checkpoint).stdout
    assert f"{len(saved.names)} layers" in text and "encoder.layer.5.intermediate.dense" in text and "1536×384" in text
    assert not any(line.endswith(" ") for line in text.splitlines())
    assert "cannot read the checkpoint" in run("inspect", checkpoint / "nowhere", check_code=1).stderr


def test_verify_accepts_the_base_and_names_the_layers_of_another(trained_minilm, tmp_path):
    checkpoint, _ = trained_minilm
    ok = run("verify", checkpoint, "--base", minilm_dir())
    assert ok.stdout.count("ok ") == len(loldu.Checkpoint(checkpoint).names)
    other = tmp_path / "other"
    shutil.copytree(minilm_dir(), other)
    weights = load_file(str(other / "model.safetensors"))
    weights["encoder.layer.3.attention.self.query.weight"] *= 1.001
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    bad = run("verify", checkpoint, "--base", other, check_code=3)
    assert "MISMATCH encoder.layer.3.attention.self.query" in bad.stdout
    assert bad.stdout.count("MISMATCH") == 1 and "1 of 19 layers do not match" in bad.stderr
    # Every command refuses another base with the same exit code, and writes nothing.
    for command in ("merge", "export-lora"):
        declared = EMBEDDING if command == "export-lora" else ()
        refused = run(command, checkpoint, "--base", other, "--out", tmp_path / command, *declared, check_code=3)
        assert "encoder.layer.3.attention.self.query" in refused.stderr, refused.stderr
        assert not (tmp_path / command).exists()


def test_export_lora_writes_what_the_library_writes(trained_minilm, tmp_path):
    import loldu.torch as lt
    from conftest import adapted_minilm

    checkpoint, _ = trained_minilm
    out = tmp_path / "lora"
    result = run("export-lora", checkpoint, "--base", minilm_dir(), "--out", out, *EMBEDDING, "--base-name", "sentence-transformers/all-MiniLM-L6-v2")
    assert "wrote" in result.stdout
    lt.export_lora(adapted_minilm(checkpoint), tmp_path / "python")
    mine, theirs = tensors(out), tensors(tmp_path / "python")
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"

    again = run("export-lora", checkpoint, "--base", minilm_dir(), "--out", out, *EMBEDDING, check_code=1)
    assert "already exists" in again.stderr and "pass --force" in again.stderr and "permissions" not in again.stderr
    named = tmp_path / "named"  # an option's value that reads like --help is a value, not a request for help
    run("export-lora", checkpoint, "--base", minilm_dir(), "--out", named, *EMBEDDING, "--base-name", "--help")
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == "--help"
    run("export-lora", checkpoint, "--base", minilm_dir(), "--out", out, *EMBEDDING, "--force", "--dtype", "bf16")
    assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}
    # A layer named like an embedding must be declared: exported as linear, PEFT would load it
    # with a warning and compute something else.
    unsure = run("export-lora", checkpoint, "--base", minilm_dir(), "--out", tmp_path / "unsure", check_code=2)
    assert "--embedding embeddings.word_embeddings" in unsure.stderr and "--linear" in unsure.stderr
    assert not (tmp_path / "unsure").exists()
    both = run("export-lora", checkpoint, "--base", minilm_dir(), "--out", tmp_path / "both", "--embedding",
               "embeddings.word_embeddings", "--linear", "embeddings.word_embeddings", check_code=2)
    assert "both --embedding and --linear" in both.stderr


def test_export_lora_refuses_a_base_weight_of_more_than_five_dimensions(trained_minilm, tmp_path):
    checkpoint, _ = trained_minilm
    base = tmp_path / "base"
    shutil.copytree(minilm_dir(), base)
    weights = load_file(base / "model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight"
    weights[key] = weights[key].reshape(384, 1, 1, 1, 1, 384)  # the same values, 6 dimensions
    save_file(weights, base / "model.safetensors")
    result = run("export-lora", checkpoint, "--base", base, "--out", tmp_path / "x", *EMBEDDING, check_code=1)
    assert "6 dimensions" in result.stderr and "encoder.layer.0.attention.self.query" in result.stderr
    assert not (tmp_path / "x").exists()
    # With 4 dimensions it is a convolution, whatever its name: declaring it an embedding is refused.
    weights[key] = weights[key].reshape(384, 384, 1, 1)
    save_file(weights, base / "model.safetensors")
    declared = run("export-lora", checkpoint, "--base", base, "--out", tmp_path / "y", *EMBEDDING,
                   "--embedding", "encoder.layer.0.attention.self.query", check_code=2)
    assert "exported as a convolution" in declared.stderr and not (tmp_path / "y").exists()


def test_merge_writes_what_the_library_writes_and_refuses_bad_input(trained_minilm, tmp_path):
    checkpoint, _ = trained_minilm
    out = tmp_path / "merged"
    run("merge", checkpoint, "--base", minilm_dir(), "--out", out)
    loldu.merge_model(checkpoint, minilm_dir(), tmp_path / "python")
    for name in os.listdir(tmp_path / "python"):
        if os.path.isfile(tmp_path / "python" / name):
            assert (out / name).read_bytes() == (tmp_path / "python" / name).read_bytes(), name
    run("merge", checkpoint, "--base", minilm_dir(), "--out", tmp_path / "f16", "--dtype", "f16")
    assert tensors(tmp_path / "f16")["encoder.layer.0.attention.self.query.weight"].dtype == torch.float16

    exists = run("merge", checkpoint, "--base", minilm_dir(), "--out", out, check_code=1)
    assert "already exists" in exists.stderr and "new directory" in exists.stderr
    missing = run("merge", checkpoint, "--base", tmp_path / "nowhere", "--out", tmp_path / "x", check_code=1)
    assert "cannot read the base model" in missing.stderr and "nowhere" in missing.stderr and "(--base)" in missing.stderr
    assert "(--base)" in run("verify", checkpoint, "--base", tmp_path / "nowhere", check_code=1).stderr
    truncated = tmp_path / "truncated"
    shutil.copytree(minilm_dir(), truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(1 << 20)
    cut = run("merge", checkpoint, "--base", truncated, "--out", tmp_path / "x", check_code=1)
    assert "model.safetensors" in cut.stderr and "damaged" in cut.stderr
    assert not (tmp_path / "x").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")  # refused before any work, as a file would be
    assert "already exists" in run("merge", checkpoint, "--base", minilm_dir(), "--out", tmp_path / "link",
                                   check_code=1).stderr
    assert os.listdir(tmp_path / "empty") == [] and (tmp_path / "link").is_symlink()


def test_a_killed_merge_leaves_no_output_and_the_next_one_cleans_up(trained_minilm, tmp_path):
    checkpoint, _ = trained_minilm
    out = tmp_path / "merged"
    rng = random.Random(7)
    start = time.monotonic()
    run("merge", checkpoint, "--base", minilm_dir(), "--out", tmp_path / "timing")
    duration = time.monotonic() - start
    finished = 0
    for _ in range(12):
        process = subprocess.Popen([str(CLI), "merge", str(checkpoint), "--base", str(minilm_dir()), "--out", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, duration))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():  # finished before the kill: then it is complete
            assert (out / "model.safetensors").read_bytes() == (tmp_path / "timing" / "model.safetensors").read_bytes()
            finished += 1
            shutil.rmtree(out)
    assert finished < 12, "every merge finished before its kill: the test did not interrupt any"
    others = [".merged.backup", ".merged.Ab3xY9"]  # not the merges' own: kept
    for name in others:
        os.mkdir(tmp_path / name)
        (tmp_path / name / "notes.txt").write_text("keep")
    run("merge", checkpoint, "--base", minilm_dir(), "--out", out)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == sorted(others)  # the next merge removed the remains
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "timing" / "model.safetensors").read_bytes()


def test_ctrl_c_or_sigterm_stops_a_merge_and_leaves_nothing_behind(trained_minilm, tmp_path):
    """Caught, the signal stops the merge at its next tensor; the library removes what it had
    written, and the tool then dies of the signal (as the shell expects)."""
    checkpoint, _ = trained_minilm
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / f"merged-{sig.name}"
        process = subprocess.Popen([str(CLI), "merge", str(checkpoint), "--base", str(minilm_dir()), "--out", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while process.poll() is None and not any(n.startswith(f".{out.name}.") for n in os.listdir(tmp_path)):
            time.sleep(0.001)  # (until the merge writes: its temporary directory appears)
        process.send_signal(sig)
        _, stderr = process.communicate()
        assert process.returncode == -sig, stderr
        assert f'stopped by signal {int(sig)}; "{out}" was not written' in stderr
        assert os.listdir(tmp_path) == []  # no output, no temporary left


def tiny_model(directory) -> pathlib.Path:
    """A model directory of two small layers and a LoLDU checkpoint on it (``directory/ckpt``)."""
    rng = np.random.default_rng(0)
    weights = {"a.weight": rng.standard_normal((6, 5)).astype(np.float32),
               "b.weight": rng.standard_normal((4, 6)).astype(np.float32)}
    base = pathlib.Path(directory) / "base"
    base.mkdir()
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text("{}")
    adapters = {name[:-len(".weight")]: loldu.Adapter(w, rank=3) for name, w in weights.items()}
    for adapter in adapters.values():
        adapter.z[:] += 0.1
    loldu.save(pathlib.Path(directory) / "ckpt", adapters)
    return base


def test_a_base_without_a_layer_is_a_mismatch_for_every_command_whatever_its_name(tmp_path):
    """A layer named like an embedding asks for --embedding / --linear only when the base has it:
    missing, it is a mismatch (exit 3), as merge and verify say."""
    weights = {"embed_tokens.weight": np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)}
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loldu.save(tmp_path / "ckpt", {"embed_tokens": loldu.Adapter(weights["embed_tokens.weight"], rank=2)})
    other = tmp_path / "other"
    other.mkdir()
    save_file({"lm_head.weight": weights["embed_tokens.weight"]}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    (other / "config.json").write_text("{}")
    for command in ("export-lora", "merge"):
        failed = run(command, tmp_path / "ckpt", "--base", other, "--out", tmp_path / command, check_code=3)
        assert "embed_tokens" in failed.stderr and "--embedding" not in failed.stderr, failed.stderr
    run("verify", tmp_path / "ckpt", "--base", other, check_code=3)


def test_concurrent_merges_to_one_directory_give_one_result(tmp_path):
    """Each merge either writes the directory or says it exists: a merge's fresh temporary
    directory is never taken by the other's clean-up of leftovers."""
    base = tiny_model(tmp_path)
    command = [str(CLI), "merge", str(tmp_path / "ckpt"), "--base", str(base), "--out", str(tmp_path / "out")]
    for _ in range(150):  # (the race hit about one round in a hundred)
        processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for _ in range(4)]
        results = [(p.wait(timeout=60), p.stderr.read()) for p in processes]
        for p in processes:
            p.stderr.close()
        assert sorted(code for code, _ in results) == [0, 1, 1, 1], results
        assert all("already exists" in message for code, message in results if code), results
        assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
        shutil.rmtree(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["base", "ckpt"]


def test_outputs_may_have_the_longest_names_the_file_system_takes(tmp_path):
    base = tiny_model(tmp_path)
    weights = {name[:-len(".weight")]: w for name, w in load_file(str(base / "model.safetensors")).items()}
    (tmp_path / "long").mkdir()
    for name in ("x" * 255, "é" * 127 + "x"):  # 255 bytes each
        run("merge", tmp_path / "ckpt", "--base", base, "--out", tmp_path / name)
        assert sorted(os.listdir(tmp_path / name)) == ["config.json", "model.safetensors"]
        loldu.export_merged(tmp_path / "long" / name, loldu.load(tmp_path / "ckpt", weights))
    assert len(os.listdir(tmp_path / "long")) == 2


def test_a_merge_refuses_before_any_work(tmp_path):
    """What a merge would refuse at the end is refused before the first tensor."""
    base = tiny_model(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    for out in ("link", "link/", "file/"):
        seen = []
        with pytest.raises(loldu.LoLDUIOError, match="already exists"):
            loldu.merge_model(tmp_path / "ckpt", base, str(tmp_path / out), progress=lambda *a: seen.append(a))
        assert seen == [], out
    os.close(os.open(bytes(base) + b"/n\xff", os.O_CREAT | os.O_WRONLY))  # a name no path can give
    seen = []
    with pytest.raises(loldu.LoLDUIOError, match="not valid UTF-8"):
        loldu.merge_model(tmp_path / "ckpt", base, tmp_path / "merged", progress=lambda *a: seen.append(a))
    assert seen == [] and not (tmp_path / "merged").exists()
    with pytest.raises(loldu.InvalidArgumentError, match="is 256 bytes; the file system .* at most 255 bytes"):
        loldu.merge_model(tmp_path / "ckpt", base, tmp_path / ("é" * 128), progress=lambda *a: seen.append(a))
    assert seen == []
    assert "is 256 bytes" in run("merge", tmp_path / "ckpt", "--base", base, "--out", tmp_path / ("x" * 256),
                                 check_code=2).stderr


def can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt && umount /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="a full disk needs root and mount namespaces (unshare -m)")
def test_a_full_disk_fails_the_merge_cleanly(trained_minilm, tmp_path):
    checkpoint, _ = trained_minilm
    # A 40 MB tmpfs in a private mount namespace: the 91 MB model cannot fit.
    script = (f"mount -t tmpfs -o size=40m none {tmp_path} && "
              f"{CLI} merge {checkpoint} --base {minilm_dir()} --out {tmp_path}/merged; code=$?; "
              f"ls -A {tmp_path}; exit $code")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "No space left on device" in result.stderr
    assert result.stdout.strip() == ""  # no output directory, no temporary left in the full file system
