"""Two gloo processes (DDP and FSDP2) follow the one-process loss trajectory with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import titans.train.trainer as trainer_mod
from titans.train import checkpoint as ckpt

from _train_helpers import fake_build_sources, tiny_run

HERE = Path(__file__).parent


def _trajectory(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in records]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_run_matches_one_process(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(trainer_mod, "build_sources", fake_build_sources)
    trainer_mod.train(tiny_run(tmp_path / "single", max_steps=4, eval_every=2, checkpoint_every=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_dist_train.py"), str(tmp_path / mode), mode]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, multi = _trajectory(tmp_path / "single"), _trajectory(tmp_path / mode)
    assert [s for s, _, _ in single] == [s for s, _, _ in multi] == [1, 2, 3, 4]
    for (_, a, va), (_, b, vb) in zip(single, multi):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
        assert (va is None) == (vb is None) and (va is None or vb == pytest.approx(va, rel=1e-5))
    # the sharded run's checkpoint is a full one that loads into a plain model
    model, _, info = ckpt.load_pretrained(tmp_path / mode)
    plain, _, _ = ckpt.load_pretrained(tmp_path / "single")
    assert info["step"] == 4
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p - q).abs().max() < 1e-4, name
