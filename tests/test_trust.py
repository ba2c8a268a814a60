"""Nothing executes from a file: checkpoints (training, exported, time-series) hold safetensors and
JSON only; a file carrying a pickle payload, even with a manifest rewritten to match it, is refused
by resume, init_from, inference loading and the time-series loader without running it; manifest
entries that leave the checkpoint directory are refused."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from titans.data.tokenizers import ByteTokenizer
from titans.model import TitansLM
from titans.train import checkpoint as ckpt
from titans.train import trainer as trainer_mod
from titans.train.tree_io import TreeError, load_tree, save_tree
from titans.io.files import sha256_file

from _train_helpers import fake_build_sources, tiny_run


@pytest.fixture(autouse=True)
def _fake_data(monkeypatch):
    monkeypatch.setattr(trainer_mod, "build_sources", fake_build_sources)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the proof that a loader ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(directory, name, marker):
    """Replace ``directory/name`` by a pickle payload and rewrite the manifest to match it."""
    with open(directory / name, "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    _match_manifest(directory, name)


def _match_manifest(directory, name):
    """Rewrite the manifest entry of ``directory/name`` to match the file, as a hostile sender would."""
    manifest = json.loads((directory / "MANIFEST.json").read_text())
    manifest[name] = {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
    (directory / "MANIFEST.json").write_text(json.dumps(manifest))


def test_tree_round_trips_training_state(tmp_path):
    np_rng = np.random.get_state()
    tree = {
        "step": 7, "lr": 1e-3, "nan": float("nan"), "inf": -math.inf, "name": "x", "none": None, "flag": True,
        "rng": {"numpy": np_rng, "torch": torch.get_rng_state(), "python": (3, tuple(range(5)), None)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(3, 2)}}, "param_groups": [{"betas": (0.9, 0.95)}]},
        "half": torch.ones(2, dtype=torch.bfloat16), "empty": [], "nested": [[1, 2], {"a": ()}],
    }  # fmt: skip
    save_tree(tree, tmp_path / "t.safetensors")
    back = load_tree(tmp_path / "t.safetensors")
    assert back["step"] == 7 and back["lr"] == 1e-3 and math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert back["rng"]["python"] == (3, (0, 1, 2, 3, 4), None)
    assert back["rng"]["numpy"][0] == np_rng[0] and back["rng"]["numpy"][1].dtype == np_rng[1].dtype
    assert np.array_equal(back["rng"]["numpy"][1], np_rng[1]) and back["rng"]["numpy"][2:] == np_rng[2:]
    assert torch.equal(back["rng"]["torch"], tree["rng"]["torch"])
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], tree["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95) and back["half"].dtype == torch.bfloat16
    assert back["nested"] == [[1, 2], {"a": ()}] and back["empty"] == [] and back["none"] is None
    np.random.set_state(back["rng"]["numpy"])  # restores as NumPy expects it


def test_tree_refuses_objects_and_foreign_files(tmp_path):
    with pytest.raises(TreeError, match=r"state\.bad: a _Payload cannot be stored"):
        save_tree({"bad": _Payload(tmp_path / "m")}, tmp_path / "t.safetensors")
    marker = tmp_path / "ran"
    with open(tmp_path / "p.safetensors", "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(TreeError, match="not a safetensors file"):
        load_tree(tmp_path / "p.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(TreeError, match="no stored state"):
        load_tree(tmp_path / "plain.safetensors")
    assert not marker.exists()


def test_checkpoint_holds_no_pickle_and_resumes(tmp_path):
    run = tiny_run(tmp_path / "run", max_steps=2)
    trainer_mod.train(run)
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert sorted(p.name for p in latest.iterdir()) == sorted([*ckpt.FILES, "MANIFEST.json"])
    for name in ckpt.FILES:
        assert not (latest / name).read_bytes().startswith(b"\x80"), f"{name} is a pickle"
    state = ckpt.read_checkpoint(latest)
    assert state["trainer"]["step"] == 2 and state["optimizer"]["state"]
    summary = trainer_mod.train(tiny_run(tmp_path / "run", max_steps=4), resume="auto")
    assert summary["step"] == 4


@pytest.mark.parametrize("name", ["optimizer.safetensors", "trainer.safetensors", "model.safetensors"])
def test_resume_refuses_a_pickle_payload_without_running_it(tmp_path, name):
    trainer_mod.train(tiny_run(tmp_path / "run", max_steps=2))
    marker = tmp_path / "ran"
    _plant(ckpt.latest_checkpoint(tmp_path / "run"), name, marker)
    with pytest.raises(ckpt.CheckpointError, match=name):
        trainer_mod.train(tiny_run(tmp_path / "run", max_steps=4), resume="auto")
    assert not marker.exists()


def test_an_earlier_versions_pickled_checkpoint_is_refused_for_resume(tmp_path):
    trainer_mod.train(tiny_run(tmp_path / "run", max_steps=2))
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "ran"
    manifest = json.loads((latest / "MANIFEST.json").read_text())
    for new, old in (("optimizer.safetensors", "optimizer.pt"), ("trainer.safetensors", "trainer.pt")):
        (latest / new).unlink()
        del manifest[new]
        (latest / "MANIFEST.json").write_text(json.dumps(manifest))
        _plant(latest, old, marker)
        manifest = json.loads((latest / "MANIFEST.json").read_text())
    with pytest.raises(ckpt.CheckpointError, match="earlier titans.*init_from"):
        trainer_mod.train(tiny_run(tmp_path / "run", max_steps=4), resume="auto")
    # its weights still start a new run and load for inference; the pickles are never read
    trainer_mod.train(tiny_run(tmp_path / "new", max_steps=1, init_from=str(latest)))
    ckpt.load_pretrained(latest)
    assert not marker.exists()


def test_inference_and_init_from_refuse_a_pickled_weights_file(tmp_path):
    trainer_mod.train(tiny_run(tmp_path / "run", max_steps=2))
    out = ckpt.export_for_inference(tmp_path / "run", tmp_path / "export")
    marker = tmp_path / "ran"
    _plant(out, "model.safetensors", marker)
    with pytest.raises(ckpt.CheckpointError, match="not a safetensors weights file"):
        ckpt.load_pretrained(out)
    with pytest.raises(ckpt.CheckpointError, match="not a safetensors weights file"):
        trainer_mod.train(tiny_run(tmp_path / "new", max_steps=1, init_from=str(out)))
    assert not marker.exists()


def test_cli_eval_and_generate_refuse_a_pickled_checkpoint(tmp_path, capsys):
    from titans.__main__ import main

    trainer_mod.train(tiny_run(tmp_path / "run", max_steps=2))
    out = ckpt.export_for_inference(tmp_path / "run", tmp_path / "export")
    marker = tmp_path / "ran"
    _plant(out, "model.safetensors", marker)
    assert main(["generate", "--checkpoint", str(out), "--prompt", "ab", "--max-new-tokens", "2"]) == 2
    assert main(["eval", "throughput", "--checkpoint", str(out), "--lengths", "64", "--out", str(tmp_path / "e")]) == 2
    assert "not a safetensors weights file" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["../escape", "/etc/passwd", "sub/../../x", ".."])
def test_manifest_entries_must_be_files_of_the_checkpoint(tmp_path, entry):
    trainer_mod.train(tiny_run(tmp_path / "run", max_steps=2))
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    manifest = json.loads((latest / "MANIFEST.json").read_text())
    manifest[entry] = {"bytes": 0, "sha256": "0" * 64}
    (latest / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="not a file of the checkpoint directory"):
        ckpt.verify_checkpoint(latest)


def test_timeseries_loader_refuses_a_pickle(tmp_path):
    from titans.timeseries.experiment import load_checkpoint

    marker = tmp_path / "ran"
    path = tmp_path / "old.pt"
    torch.save({"model_config": {}, "state_dict": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="not a titans timeseries checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- one run per directory


def _hold_lock_in_a_subprocess(out_dir):
    import subprocess
    import sys

    code = ("import sys, time\nfrom titans.train.lock import run_lock\n"
            f"with run_lock({str(out_dir)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_in_the_same_directory_is_refused_and_a_killed_ones_is_taken_over(tmp_path, capsys):
    from titans.errors import UserError
    from titans.train.lock import RunLockError

    out = tmp_path / "run"
    holder = _hold_lock_in_a_subprocess(out)
    try:
        with pytest.raises(RunLockError, match=rf"in use by another titans train \(pid {holder.pid} on"):
            trainer_mod.train(tiny_run(out, max_steps=2))
        assert not (out / "metrics.jsonl").exists()  # nothing of the refused run was written
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, the pid stays in the file
        holder.wait()
    assert issubclass(RunLockError, UserError)  # the CLI exits 2 with the message
    (out / "checkpoints" / ".step-0000004.x1y2").mkdir(parents=True)  # a write the kill interrupted
    summary = trainer_mod.train(tiny_run(out, max_steps=2))
    assert summary["step"] == 2
    said = capsys.readouterr().out
    assert f"pid {holder.pid}" in said and "did not exit cleanly" in said and "unfinished checkpoint" in said
    assert not list((out / "checkpoints").glob(".step-*"))
    assert (out / ".lock").read_text() == ""  # released cleanly: the next run says nothing
    trainer_mod.train(tiny_run(out, max_steps=4), resume="auto")
    assert "did not exit cleanly" not in capsys.readouterr().out


def test_repeated_interruptions_keep_the_checkpoint_count(tmp_path):
    out = tmp_path / "run"
    for stop in (2, 4, 6, 8):
        trainer_mod.train(tiny_run(out, max_steps=10, checkpoint_every=1, keep_checkpoints=2), resume="auto",
                          stop_at_step=stop)  # fmt: skip
        (out / "checkpoints" / f".step-{stop + 1:07d}.tmp").mkdir()  # as a kill mid-write leaves it
        assert len(ckpt.list_checkpoints(out)) == 2
    trainer_mod.train(tiny_run(out, max_steps=10, checkpoint_every=1, keep_checkpoints=2), resume="auto")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000009", "step-0000010"]
    assert not list((out / "checkpoints").glob(".step-*"))


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path, capsys):
    """A run killed while appending to metrics.jsonl leaves half a line: the resume leaves it out
    with a warning, keeps the records up to its checkpoint and logs on."""
    out = tmp_path / "run"
    trainer_mod.train(tiny_run(out, max_steps=4), stop_at_step=2)
    metrics = out / "metrics.jsonl"
    with open(metrics, "ab") as f:
        f.write(b'{"step": 3, "loss": 1.2')  # the kill came mid-write
    capsys.readouterr()
    summary = trainer_mod.train(tiny_run(out, max_steps=4), resume="auto")
    assert summary["step"] == 4
    assert "metrics.jsonl: left out 1 unreadable line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4


def test_timeseries_report_leaves_out_a_torn_row(tmp_path, capsys):
    from titans.timeseries.report import append_result, read_results

    path = tmp_path / "results.jsonl"
    append_result(path, {"dataset": "ETTh1", "mse": 0.4})
    with open(path, "ab") as f:
        f.write(b'{"dataset": "ETT\xff')
    append_result(path, {"dataset": "ETTh2", "mse": 0.3})  # a later run's row starts a line of its own
    assert [r["dataset"] for r in read_results(path)] == ["ETTh1", "ETTh2"]
    assert "left out 1 unreadable line (2;" in capsys.readouterr().err


def test_the_default_run_config_fits_its_tokenizer():
    from titans.model import TitansConfig
    from titans.train.config import load_run_config
    from titans.train.sources import build_tokenizer

    run = load_run_config(None, [])
    assert run.model.vocab_size == build_tokenizer(run.data.tokenizer).vocab_size == 257
    assert TitansConfig.preset("tiny").vocab_size == 257


# ----------------------------------------------------------------------------- divergence named


def test_a_diverging_memory_is_named_where_it_starts():
    from titans.errors import MemoryDivergedError, NonFiniteError
    from titans.layers import NeuralMemory
    from titans.model import TitansConfig, TitansLM

    torch.manual_seed(0)
    # theta large, momentum near 1, no forgetting, and the paper's unbounded step (no clip)
    blowup = dict(theta_init=5.0, eta_init=0.99, alpha_init=1e-4, max_grad_norm=None)
    layer = NeuralMemory(32, heads=2, chunk_size=4, depth=3, **blowup)
    with pytest.raises(MemoryDivergedError, match=r"diverged at token \d+ of its input, head \d.*max_grad_norm"):
        layer(torch.randn(1, 400, 32) * 30)
    assert issubclass(MemoryDivergedError, NonFiniteError)  # the trainer reports it as a diverged run
    cfg = TitansConfig(variant="mag", vocab_size=50, dim=32, depth=2, heads=2, window=8, memory_chunk=4,
                       memory_depth=3, **{f"memory_{k}": v for k, v in blowup.items()})  # fmt: skip
    model = TitansLM(cfg)
    with torch.no_grad():
        model.embed.weight.mul_(100)
    with pytest.raises(MemoryDivergedError, match=r"^block 0 \(this call starts at stream token 0\): the neural"):
        model(torch.randint(0, 50, (1, 400)))
    # bounded steps keep the same memory finite
    layer = NeuralMemory(32, heads=2, chunk_size=4, depth=3, max_grad_norm=1.0, theta_activation="sigmoid",
                         max_lr=0.1, theta_init=0.09, eta_init=0.99, alpha_init=1e-4)  # fmt: skip
    y, _ = layer(torch.randn(1, 400, 32) * 30)
    assert torch.isfinite(y).all()


def test_the_default_inner_step_is_bounded_and_the_paper_update_is_one_switch_away():
    """An untrained MAG with the paper's unbounded update diverges on random bytes within ~600
    tokens; the default clip (memory_max_grad_norm=10) keeps it finite."""
    from titans.errors import MemoryDivergedError
    from titans.layers import NeuralMemory
    from titans.model import TitansConfig, TitansLM

    assert TitansConfig().memory_max_grad_norm == NeuralMemory(32, heads=2).max_grad_norm == 10.0
    shape = dict(variant="mag", vocab_size=256, dim=256, depth=2, heads=4, window=128, segment=128, memory_chunk=64)
    ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    paper = TitansLM(TitansConfig(**shape, memory_max_grad_norm=None)).eval()
    with torch.no_grad(), pytest.raises(MemoryDivergedError):
        paper(ids)
    torch.manual_seed(0)
    bounded = TitansLM(TitansConfig(**shape)).eval()
    with torch.no_grad():
        assert torch.isfinite(bounded(ids)[0]).all()


# ----------------------------------------------------------------------------- user mistakes: one line, exit 2


@pytest.mark.parametrize("argv, said", [
    (["generate", "--checkpoint", "CK", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", "--checkpoint", "CK", "--top-k", "-3"], "--top-k must be >= 1"),
    (["generate", "--checkpoint", "CK", "--top-p", "2"], "--top-p must lie in (0, 1]"),
    (["generate", "--checkpoint", "CK", "--top-p", "nan"], "--top-p must lie in (0, 1]"),
    (["generate", "--checkpoint", "CK", "--chunk-tokens", "0"], "--chunk-tokens must lie in [1,"),
    (["generate", "--checkpoint", "CK", "--prompt-file", "BAD"], "is not UTF-8 text"),
    (["generate", "--checkpoint", "CK", "--prompt-file", "DIR"], "cannot be read"),
    (["generate", "--checkpoint", "CK", "--prompt-file", "MISSING"], "cannot be read"),
    (["train", "--config", "BAD.yaml"], "is not UTF-8 text"),
    (["train", "--train.lr=nan"], "train.lr must be a finite number > 0"),
    (["train", "--train.max_minutes=0"], "train.max_minutes must be a finite number of minutes > 0"),
    (["eval", "niah", "--checkpoint", "CK", "--lengths", "1K", "--out", "FILE"], "is a file"),
])  # fmt: skip
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, said):
    from titans.__main__ import main

    ck = ckpt.save_for_inference(TitansLM(tiny_run(tmp_path).model), ByteTokenizer(), tmp_path / "ck")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "BAD.yaml").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    names = {"CK": ck, "BAD": tmp_path / "bad.txt", "BAD.yaml": tmp_path / "BAD.yaml", "DIR": tmp_path / "dir",
             "MISSING": tmp_path / "missing.txt", "FILE": tmp_path / "file"}  # fmt: skip
    argv = [str(names.get(a, a)) for a in argv]
    assert main(argv + ([f"--train.out_dir={tmp_path / 'run'}"] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "Traceback" not in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- a state belongs to its model


def _lm(**kw):
    from titans.model import TitansConfig

    torch.manual_seed(0)
    base = dict(variant="mac", vocab_size=64, dim=32, depth=2, heads=2, segment=8, window=8, memory_chunk=4)
    return TitansLM(TitansConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("other, named", [
    (dict(variant="transformer"), r"\(variant: state transformer, model mac\)"),
    (dict(memory_depth=3), "memory_depth: state 3, model 2"),
    (dict(dim=48), "dim: state 48, model 32"),
    (dict(segment=16), "segment: state 16, model 8"),
    (dict(memory_expansion=2.0), "memory_expansion: state 2.0, model 4.0"),
    (dict(memory_heads=1), "memory_heads: state 1, model 2"),
    (dict(memory_gate_kernel=3), "memory_gate_kernel: state 3, model 0"),
])  # fmt: skip
def test_a_state_from_another_layout_is_refused_naming_both_sides(other, named, tmp_path):
    from titans.errors import StateMismatchError
    from titans.inference.state_io import load_state, save_state

    model, ids = _lm(), torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        foreign = _lm(**other)(ids)[2]
        if other.get("variant") == "transformer":  # and the other way round
            with pytest.raises(StateMismatchError, match="variant: state mac, model transformer"):
                _lm(**other)(ids, state=model(ids)[2])
        with pytest.raises(StateMismatchError, match=named):
            model(ids, state=foreign)
        save_state(foreign, tmp_path / "s")
        load_state(tmp_path / "s")  # without a model: read as it is
        with pytest.raises(StateMismatchError, match=named):
            load_state(tmp_path / "s", model=model)
        own = model(ids)[2]
        model(ids, state=own)  # its own state continues
        # test-time settings are not part of the layout, nor are equal spellings of one
        _lm(memory_max_grad_norm=3.0)(ids, state=own)
        _lm(memory_heads=2, memory_expansion=4)(ids, state=own)


def test_state_files_refuse_flipped_bits_empty_layers_negative_positions_and_other_dtypes(tmp_path):
    from dataclasses import replace

    from titans.inference.state_io import load_state, save_state

    model, ids = _lm(), torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        state = model(ids)[2]
    save_state(state, tmp_path / "ok")
    back, _ = load_state(tmp_path / "ok", model=model)
    assert back.fingerprint == model.state_fingerprint() and back.position == 12
    save_state(state, tmp_path / "flip")
    data = bytearray((tmp_path / "flip" / "state.safetensors").read_bytes())
    data[-3] ^= 0x01
    (tmp_path / "flip" / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_state(tmp_path / "flip")
    save_state(replace(state, layers=[]), tmp_path / "empty")
    with pytest.raises(ValueError, match="no layers"):
        load_state(tmp_path / "empty")
    save_state(replace(state, position=-4), tmp_path / "neg")
    with pytest.raises(ValueError, match="position must be an integer >= 0"):
        load_state(tmp_path / "neg")
    with pytest.raises(ValueError, match="position must be an integer >= 0"):
        model(ids, state=replace(state, position=-4))
    save_state(state, tmp_path / "f64")
    with pytest.raises(ValueError, match="the model computes in torch.float64"):
        load_state(tmp_path / "f64", model=_lm().double())
    with pytest.raises(ValueError, match="fingerprint is malformed"):
        model(ids, state=replace(state, fingerprint="garbage"))
    half = _lm(variant="mag").to(torch.bfloat16)  # its memory state stays float32: still its own
    with torch.no_grad():
        save_state(half(ids)[2], tmp_path / "bf16")
    load_state(tmp_path / "bf16", model=half)


@pytest.mark.parametrize("other", [dict(depth=3), dict(expansion=2.0), dict(heads=4)])
def test_a_memory_layer_refuses_a_state_of_another_shape(other):
    from titans.errors import StateMismatchError
    from titans.layers import NeuralMemory

    x = torch.randn(1, 8, 32)
    _, foreign = NeuralMemory(32, **{**dict(heads=2, depth=2, chunk_size=4), **other})(x)
    layer = NeuralMemory(32, heads=2, depth=2, chunk_size=4)
    with pytest.raises(StateMismatchError, match=r"this layer's has 2 of \[\(2, 64, 16\), \(2, 16, 64\)\]"):
        layer(x, foreign)
    layer(x, layer(x)[1])  # its own state continues


def test_bad_labels_and_input_dtypes_are_named():
    from titans.layers import NeuralMemory
    from titans.model import TitansConfig

    model = TitansLM(TitansConfig(variant="swa", vocab_size=20, dim=16, depth=1, heads=2, window=4))
    ids = torch.randint(0, 20, (2, 8))
    for labels, err, said in (
        (torch.full((2, 8), 50), ValueError, r"labels must lie in \[0, vocab_size=20\) or be -100"),
        (torch.zeros(2, 5, dtype=torch.long), ValueError, r"labels must have input_ids' shape \(2, 8\)"),
        (torch.full((2, 8), -100), ValueError, "nothing to score"),
        (torch.zeros(2, 8), TypeError, "labels must be int64 token ids"),
        (ids.int(), TypeError, "labels must be int64 token ids"),
    ):
        with pytest.raises(err, match=said):
            model(ids, labels=labels)
    labels = ids.clone()
    labels[:, 0] = 99  # the first position is never a target: not checked
    model(ids, labels=labels)
    with pytest.raises(ValueError, match="at least 2 positions"):
        model(ids[:, :1], labels=ids[:, :1])
    layer = NeuralMemory(16, heads=2)
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(TypeError, match=f"x is {dtype} but the layer's weights are torch.float32"):
            layer(torch.randn(1, 4, 16, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(1, 4, 16))


def test_resume_auto_skips_a_damaged_latest_checkpoint_and_an_empty_latest_pointer(tmp_path, capsys):
    out = tmp_path / "run"
    trainer_mod.train(tiny_run(out, max_steps=4, checkpoint_every=2, keep_checkpoints=3))
    latest = ckpt.latest_checkpoint(out)
    assert latest.name == "step-0000004"
    (ckpt.checkpoint_root(out) / "LATEST").write_text("")  # emptied by a crash
    assert ckpt.latest_checkpoint(out).name == "step-0000004"
    with open(latest / "optimizer.safetensors", "r+b") as f:  # damaged: truncated
        f.truncate(10)
    summary = trainer_mod.train(tiny_run(out, max_steps=6, checkpoint_every=2, keep_checkpoints=3), resume="auto")
    said = capsys.readouterr().out
    assert "resuming from step-0000002: newer checkpoint(s) are damaged and were set aside as " in said
    assert "truncated" in said and summary["step"] == 6
    assert (ckpt.checkpoint_root(out) / ".damaged-step-0000004").is_dir()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000002", "step-0000004", "step-0000006"]


def test_pruning_after_a_damaged_checkpoint_keeps_the_new_ones(tmp_path):
    out = tmp_path / "run"
    trainer_mod.train(tiny_run(out, max_steps=4, checkpoint_every=2, keep_checkpoints=1))
    with open(ckpt.latest_checkpoint(out) / "model.safetensors", "r+b") as f:
        f.truncate(10)
    # keep=1 left only step 4: put an intact step 2 (the same run's) beside it
    trainer_mod.train(tiny_run(tmp_path / "ref", max_steps=2, checkpoint_every=2))
    shutil.copytree(ckpt.latest_checkpoint(tmp_path / "ref"), ckpt.checkpoint_root(out) / "step-0000002")
    trainer_mod.train(tiny_run(out, max_steps=3, checkpoint_every=1, keep_checkpoints=1), resume="auto")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000003"]
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(out))


def test_tree_metadata_that_lies_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    lies = [json.dumps({"format": 1, "tree": {"ndarray": "0", "dtype": "bogus"}}),  # no such dtype
            json.dumps({"format": 1, "tree": {"ndarray": "0", "dtype": "<u4"}}),  # a bf16 tensor called an array
            '{"format": 1, "tree": ' + "[" * 5000 + "]" * 5000 + "}"]  # deeper than any parser's recursion
    for meta in lies:
        save_file({"0": torch.ones(2, dtype=torch.bfloat16)}, str(tmp_path / "t.safetensors"), metadata={"titans.tree": meta})
        with pytest.raises(TreeError):
            load_tree(tmp_path / "t.safetensors")


def test_a_saved_config_without_the_clip_field_loads_with_no_clip(tmp_path):
    """Configs saved before every field was written lack memory_max_grad_norm: they were trained
    with the paper's update, and load so (TitansConfig.from_dict, a checkpoint, a HF config.json,
    a time-series config), while a new config gets the bounded default."""
    import json

    from titans.model import TitansConfig
    from titans.timeseries.models import ForecasterConfig

    saved = TitansConfig(variant="mag", dim=32, heads=2, vocab_size=64, memory_max_grad_norm=None).to_dict()
    del saved["memory_max_grad_norm"]
    assert TitansConfig.from_dict(saved).memory_max_grad_norm is None
    assert TitansConfig(variant="mag").memory_max_grad_norm == 10.0
    ckpt.save_checkpoint(tmp_path / "run", 1, TitansLM(TitansConfig.from_dict(saved)).state_dict(), {}, {},
                         {"config": {"model": saved}, "tokenizer": ByteTokenizer().to_spec(), "step": 1})  # fmt: skip
    model, _, _ = ckpt.load_pretrained(tmp_path / "run")
    assert model.cfg.memory_max_grad_norm is None
    pytest.importorskip("transformers")
    from titans.hf import TitansForCausalLM, TitansHFConfig

    TitansForCausalLM.from_titans(model).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["memory_max_grad_norm"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert TitansForCausalLM.from_pretrained(tmp_path / "hf").config.memory_max_grad_norm is None
    assert TitansHFConfig(variant="mag").memory_max_grad_norm == 10.0
    assert ForecasterConfig.from_dict({"model": "titans"}).mem_max_grad_norm is None


# ----------------------------------------------------------------------------- hostile records (independent probe)


def _rewrite(directory, name, text):
    (directory / name).write_text(text)
    _match_manifest(directory, name)


def _run_json(directory, **change):
    run = json.loads((directory / "run.json").read_text())
    for key, value in change.items():
        if key == "model":
            run["config"]["model"].update(value)
        elif value is None:
            del run[key]
        else:
            run[key] = value
    return json.dumps(run)


@pytest.mark.parametrize("name, text, said", [
    ("MANIFEST.json", "[" * 100_000 + "]" * 100_000, "MANIFEST.json is corrupted (RecursionError"),
    ("MANIFEST.json", b'{"a\xff": 1}', "MANIFEST.json is corrupted (UnicodeDecodeError"),
    ("run.json", "{not json", "run.json is corrupted (JSONDecodeError"),
    ("run.json", '{"config": ' + "[" * 100_000 + "]" * 100_000 + "}", "run.json is corrupted (RecursionError"),
    ("run.json", '{"config": {"model": {"dim": ' + "9" * 5000 + "}}}", "run.json is corrupted (ValueError: Exceeds"),
    ("run.json", "[1, 2]", "run.json is not a run record"),
    ("run.json", dict(tokenizer=None), "run.json is not a run record"),
    ("run.json", dict(tokenizer=[1]), "run.json is not a run record"),
    ("run.json", dict(model={"dim": 10**12}), "run.json's model config cannot be used (dim must be"),
    ("run.json", dict(model={"variant": "__import__('os')"}), "run.json's model config cannot be used (variant"),
    ("run.json", dict(tokenizer={"name": "sentencepiece", "path": "/etc/passwd"}), "run.json's tokenizer cannot be loaded"),
    ("run.json", dict(tokenizer={"name": "bpe", "json": "{garbage"}), "run.json's tokenizer cannot be loaded"),
])  # fmt: skip
def test_a_hostile_run_record_or_manifest_is_refused_by_name(tmp_path, capsys, name, text, said):
    from titans.__main__ import main

    out = ckpt.save_for_inference(TitansLM(tiny_run(tmp_path).model), ByteTokenizer(), tmp_path / "ck")
    if isinstance(text, dict):
        text = _run_json(out, **text)
    if name == "MANIFEST.json":
        (out / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    else:
        _rewrite(out, name, text)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(said)):
        ckpt.load_pretrained(out)
    assert main(["generate", "--checkpoint", str(out), "--prompt", "ab", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


def test_a_checkpoint_file_that_links_to_anything_but_a_file_is_refused(tmp_path):
    """A link to an ordinary file (a download cache's layout) reads bytes the manifest checks; a
    link to a device, a directory or another file's bytes is refused by name, on one line."""
    import os

    out = ckpt.save_for_inference(TitansLM(tiny_run(tmp_path).model), ByteTokenizer(), tmp_path / "ck")
    shutil.move(out / "model.safetensors", tmp_path / "blob")
    os.symlink(tmp_path / "blob", out / "model.safetensors")  # the manifest still matches
    ckpt.load_pretrained(out)
    for target, said in (("/dev/zero", "which is not an ordinary file"), (tmp_path, "which is not an ordinary file"),
                         (out / "run.json", "truncated or altered")):  # fmt: skip
        (out / "model.safetensors").unlink()
        os.symlink(target, out / "model.safetensors")
        with pytest.raises(ckpt.CheckpointError, match=said):
            ckpt.load_pretrained(out)
    (out / "model.safetensors").unlink()
    os.symlink(str(tmp_path / "blob") + "\n\x1b[31m", out / "model.safetensors")  # a dangling name with escapes
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_pretrained(out)
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


@pytest.mark.parametrize("change, said", [
    (lambda t: t.update(scheduler=[1, 2]), "optimiser or trainer state does not fit this run \\(TypeError"),
    (lambda t: t.pop("rng"), "trainer.safetensors lacks step, tokens, scheduler, data, rng"),
    (lambda t: t.update(step=-5), "trainer.safetensors has step -5"),
    (lambda t: t.update(data=[]), "optimiser or trainer state does not fit this run"),
])  # fmt: skip
def test_resume_refuses_a_trainer_state_that_does_not_fit_by_name(tmp_path, change, said):
    trainer_mod.train(tiny_run(tmp_path / "run", max_steps=2))
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    tree = load_tree(latest / "trainer.safetensors")
    change(tree)
    save_tree(tree, latest / "trainer.safetensors")
    _match_manifest(latest, "trainer.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=said):
        trainer_mod.train(tiny_run(tmp_path / "run", max_steps=4), resume="auto")


def test_resume_refuses_an_optimizer_state_of_other_parameters_by_name(tmp_path):
    trainer_mod.train(tiny_run(tmp_path / "run", max_steps=2))
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    tree = load_tree(latest / "optimizer.safetensors")
    tree["state"] = {k: {} for k in list(tree["state"])[:1]}
    save_tree(tree, latest / "optimizer.safetensors")
    _match_manifest(latest, "optimizer.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="optimiser or trainer state does not fit this run"):
        trainer_mod.train(tiny_run(tmp_path / "run", max_steps=4), resume="auto")


def test_init_from_reads_its_run_record_by_name(tmp_path):
    out = ckpt.save_for_inference(TitansLM(tiny_run(tmp_path).model), ByteTokenizer(), tmp_path / "ck")
    _rewrite(out, "run.json", _run_json(out, tokenizer="bytes"))  # a bare name is a tokenizer spec too
    trainer_mod.train(tiny_run(tmp_path / "a", max_steps=1, init_from=str(out)))
    _rewrite(out, "run.json", "{x")
    with pytest.raises(ckpt.CheckpointError, match="run.json is corrupted"):
        trainer_mod.train(tiny_run(tmp_path / "b", max_steps=1, init_from=str(out)))


def test_a_lock_file_from_someone_else_is_never_written_through_nor_printed_raw(tmp_path, capsys):
    import os

    from titans.train.lock import RunLockError, run_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (tmp_path / "a").mkdir()
    os.symlink(victim, tmp_path / "a" / ".lock")
    with pytest.raises(RunLockError, match=r"\.lock is a symbolic link .*remove the link"):
        with run_lock(tmp_path / "a"):
            pass
    assert victim.read_text() == "the user's file"
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / ".lock").write_bytes(b"pid 1\n\x1b[31mred\x1b[0m\nmore" + b"\xff" * 300)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    os.symlink(outside, tmp_path / "b" / "checkpoints" / ".step-0000003.tmp")
    with run_lock(tmp_path / "b"):
        pass
    said = capsys.readouterr().out
    assert "(pid 1 ...) did not exit cleanly" in said and "\x1b" not in said and len(said.splitlines()) == 2
    assert (outside / "keep").exists() and not (tmp_path / "b" / "checkpoints" / ".step-0000003.tmp").exists()


def test_a_malformed_state_file_is_refused_by_name(tmp_path):
    from titans.inference.state_io import load_state, save_state

    model, ids = _lm(), torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        state = model(ids)[2]

    def saved(name, change=None, text=None):
        save_state(state, tmp_path / name)
        doc = json.loads((tmp_path / name / "state.json").read_text())
        if change:
            change(doc)
        (tmp_path / name / "state.json").write_text(text or json.dumps(doc))
        return tmp_path / name

    fields = lambda doc: doc["state"]["fields"]  # noqa: E731
    cases = [
        (saved("deep", text='{"format": "titans-state/1", "state": ' + "[" * 100_000 + "]" * 100_000 + "}"), "RecursionError"),
        (saved("digits", text='{"format": "titans-state/1", "state": {"value": ' + "9" * 5000 + "}}"), "Exceeds the limit"),
        (saved("nostate", lambda d: d.pop("state")), "holds no 'state'"),
        (saved("key", lambda d: fields(d).update(layers={"list": [{"tensor": ["t0"]}]})), r"tensor \['t0'\] is missing"),
        (saved("cls", lambda d: d["state"].update(dataclass=["ModelState"])), "unknown state class"),
        (saved("layers", lambda d: fields(d).update(layers={"value": 5})), "layers must be a list, got int"),
    ]  # fmt: skip
    for directory, said in cases:
        with pytest.raises(ValueError, match=said):
            load_state(directory, model=model)
    with pytest.raises(ValueError, match="records no SHA-256"):  # deleting the checksum does not skip the check
        load_state(saved("nosha", lambda d: d.pop("sha256")))


def test_hugging_face_loading_reads_no_pickle(tmp_path):
    pytest.importorskip("transformers")
    from titans.hf import TitansForCausalLM

    model = TitansForCausalLM.from_titans(_lm())
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")  # plain tensors, but a pickle
    with pytest.raises(OSError, match="model.safetensors"):
        TitansForCausalLM.from_pretrained(tmp_path / "hf")


def test_timeseries_checkpoints_and_forecasts_that_do_not_fit_are_named(tmp_path, capsys):
    from titans.timeseries.experiment import load_checkpoint
    from titans.timeseries.models import ForecasterConfig, build_forecaster
    from titans.timeseries.report import plot_runs

    config = ForecasterConfig.from_dict({"model": "dlinear", "seq_len": 32, "horizon": 8, "channels": 3})
    weights = build_forecaster(config).state_dict()
    for change, said in (
        ({"state_dict": {k: torch.zeros(3, 3) for k in weights}}, "weights do not fit its model_config"),
        ({"state_dict": {**weights, "extra": torch.zeros(1)}}, "weights do not fit its model_config"),
        ({"state_dict": [1, 2]}, "model_config / state_dict are not tables"),
        ({"model_config": "dlinear"}, "model_config / state_dict are not tables"),
        ({"model_config": {**config.to_dict(), "d_model": 10}}, "its model_config cannot be used"),
    ):
        save_tree({"model_config": config.to_dict(), "state_dict": weights, **change}, tmp_path / "c.safetensors")
        with pytest.raises(ValueError, match=said):
            load_checkpoint(tmp_path / "c.safetensors")
    forecasts = tmp_path / "out" / "forecasts"
    forecasts.mkdir(parents=True)
    marker = tmp_path / "ran"
    np.savez(forecasts / "ETTh1_dlinear_H96_seed0.npz", x=np.array([_Payload(marker)], dtype=object),
             y=np.zeros(3), pred=np.zeros(3))  # fmt: skip
    (forecasts / "notes.npz").write_bytes(b"x")
    assert plot_runs(tmp_path / "out") == []
    err = capsys.readouterr().err
    assert "notes.npz: left out (not a forecast file" in err and "seed0.npz: left out, unreadable" in err
    assert not marker.exists()


@pytest.mark.parametrize("change, said", [
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../outside.npy"), "lists shard '../outside.npy', which is not a file"),
    (lambda m: m.update(dtype="bogus"), "records dtype 'bogus', not an integer type"),
    (lambda m: m.update(dtype="O"), "records dtype 'O', not an integer type"),
    (lambda m: m["splits"]["train"].update(shards="abc"), "splits are not tables of shards"),
    (lambda m: m.update(splits=[]), "splits are not tables of shards"),
])  # fmt: skip
def test_a_data_manifest_cannot_point_outside_its_directory_nor_crash_the_reader(tmp_path, change, said):
    from titans.data.text import DataError, TokenSplit, prepare

    (tmp_path / "a.txt").write_text("Some words of text. " * 200)
    prepare([tmp_path / "a.txt"], tmp_path / "data", ByteTokenizer(), val_fraction=0.0, progress=False)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    change(manifest)
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=said):
        TokenSplit(tmp_path / "data", "train")
    (tmp_path / "data" / "manifest.json").write_text('{"format": "titans-token-shards", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError, match="is not valid JSON \\(RecursionError"):
        TokenSplit(tmp_path / "data", "train")


def test_a_config_file_with_a_python_tag_is_one_line(tmp_path, capsys):
    from titans.__main__ import main

    marker = tmp_path / "ran"
    (tmp_path / "evil.yaml").write_text(f"train:\n  lr: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", "--config", str(tmp_path / "evil.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not determine a constructor for the tag" in err and "(line 2, column 7)" in err
    assert len(err.splitlines()) == 1 and not marker.exists()


def test_inputs_and_states_found_by_the_independent_probe_are_refused_by_name():
    """Found by a second reader: each gave an internal error (SDPA's dtype error, a size mismatch,
    an AttributeError, an overflow in the clip) instead of a message naming the problem."""
    from dataclasses import replace

    from titans.errors import StateMismatchError
    from titans.layers import NeuralMemory
    from titans.model import TitansConfig

    model, ids = _lm(), torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        state64 = _lm().double()(ids)[2]
        with pytest.raises(StateMismatchError, match="holds float64 tensors, the model computes in torch.float32"):
            model(ids, state=state64)
        with pytest.raises(TypeError, match="input_ids must be a tensor"):
            model(ids.tolist())
        with pytest.raises(ValueError, match="empty batch dimension"):
            model(ids[:0])
    layer = NeuralMemory(dim=16, heads=2, chunk_size=4)
    x = torch.randn(1, 6, 16)
    _, narrow = NeuralMemory(dim=16, heads=2, chunk_size=4, conv_kernel=2)(x)
    with pytest.raises(StateMismatchError, match=r"q/k/v convolution; this layer \(conv_kernel=4\) takes \(1, 3, 48\)"):
        layer(x, narrow)
    _, own = layer(x)
    with pytest.raises(TypeError, match="state.memory must be a MemoryState"):
        layer(x, type(own)(memory=torch.zeros(3), conv=own.conv))
    with pytest.raises(ValueError, match="empty batch dimension"):
        layer(x[:0])
    for position in (2.5, -1, 4, True):
        with pytest.raises(StateMismatchError, match=r"memory position must be an integer in \[0, chunk_size=4\)"):
            layer(x, type(own)(memory=replace(own.memory, position=position), conv=own.conv))
    for make in (lambda: NeuralMemory(dim=16, heads=2, max_grad_norm=1e20),
                 lambda: TitansConfig(memory_max_grad_norm=1e20)):  # fmt: skip
        with pytest.raises(ValueError, match=r"max_grad_norm must be a number in \(0, 1e\+18\]"):
            make()
    NeuralMemory(dim=16, heads=2, max_grad_norm=1e18)(x)  # the largest bound still runs
