"""The benchmark scripts' task rows mean what their tables say (they are scripts, not the package:
imported from their path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their neighbours
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_memory_rules_scores_mqar_on_the_value_of_each_queried_key(monkeypatch):
    """Each scored target is the value that the row's key-value prefix pairs with the key read at
    that position (the token after a query is filler, so the next input is not the target)."""
    rules = _script("memory_rules", monkeypatch)
    args = SimpleNamespace(mqar_vocab=64, seed=0, answer_weight=10.0)
    task = rules.Task("mqar", args)
    inputs, targets, weight = task.batch(np.random.default_rng(0), 4, 64, 8)
    assert inputs.shape == targets.shape == weight.shape == (4, 64)
    for row in range(4):
        pairs = {int(inputs[row, 2 * i]): int(inputs[row, 2 * i + 1]) for i in range(8)}
        scored = weight[row].nonzero().flatten().tolist()
        assert len(scored) == 8
        assert all(int(targets[row, t]) == pairs[int(inputs[row, t])] for t in scored)
    kv = rules.Task("kv", args)
    inputs, targets, weight = kv.batch(np.random.default_rng(0), 2, 128, 4)
    assert (inputs[:, 1:] == targets[:, :-1]).all()  # kv: plain next-token targets
