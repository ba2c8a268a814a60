"""The torch.compile'd chunk path gives the eager numbers (slow: compiling takes a while on CPU)."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_inputs, probe_loss, rel_rms

from titans.ops.memory import chunk_memory

pytestmark = pytest.mark.slow


def test_compiled_chunk_path_matches_eager():
    kw, leaves = make_inputs(T=40, D=8, depth=2, dtype=torch.float32, requires_grad=True, seed=31)
    results = []
    for compiled in (False, True):
        y, s = chunk_memory(**kw, chunk_size=16, compile=compiled)  # 16 + 16 + a partial 8
        loss = probe_loss(y) + sum(probe_loss(t) for t in s.tensors())
        results.append((y, s, torch.autograd.grad(loss, leaves)))
    (y0, s0, g0), (y1, s1, g1) = results
    assert rel_rms(y1, y0) < 1e-5
    for a, b in zip(s1.tensors(), s0.tensors()):
        assert rel_rms(a, b) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_rms(a, b) < 1e-4
    with torch.no_grad():
        assert rel_rms(chunk_memory(**kw, chunk_size=16, compile=True)[0], y0) < 1e-5

