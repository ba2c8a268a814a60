"""``max_grad_norm``: each token's inner gradient clipped to a norm by scaling its learning rate.

The token loop computes the whole gradient and its norm directly; the chunk path and the step
use the factored norm (sum over layers of |dz|^2 |h|^2). They must agree in outputs, states and
every gradient (the scale is differentiated, not detached), with clipping active on some tokens
and not on others."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from _helpers import (
    check_analytic_backward_equals_autograd,
    check_chunk_equals_naive,
    make_inputs,
    rel_rms,
    state_tensors,
)

from titans.ops.memory import chunk_memory, naive_memory, step_memory
from titans.ops.memory.mlp import clip_scale, key_gradients

CLIP = 2.5  # between the 10% and 90% quantiles of the test inputs' gradient norms at every depth
FLAGS = list(itertools.product([True, False], repeat=3))  # momentum, forgetting, residual
GATES = ("q", "k", "v", "theta", "eta", "alpha")


def _close(a, b, tol, what):
    err = rel_rms(a, b)
    assert err < tol, f"{what}: relative RMS {err:.3e} >= {tol:.0e}"


def _clipped_fraction(kw, depth):
    """Fraction of tokens the clip acts on at the initial weights (the test must exercise both)."""
    B, T, H, D = kw["q"].shape
    W = [w.expand(B, *w.shape[-3:]).reshape(B * H, *w.shape[-2:]) for w in kw["weights"]]
    flat = lambda x: x.transpose(1, 2).reshape(B * H, T, D)  # noqa: E731
    hs, _, dzs = key_gradients(W, flat(kw["k"].detach()), flat(kw["v"].detach()), "silu", False)
    scale, _ = clip_scale(dzs, hs, CLIP)
    return (scale < 1).double().mean().item()


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 5, 16])
def test_clipped_chunk_equals_naive_float64(depth, chunk_size):
    T = 37
    for momentum, forgetting, residual in FLAGS:
        kw, leaves = make_inputs(
            T=T, depth=depth, momentum=momentum, forgetting=forgetting, requires_grad=True, seed=depth + chunk_size
        )
        frac = _clipped_fraction(kw, depth)
        assert 0.05 < frac < 0.95, f"clip acts on {frac:.0%} of tokens: the test would not exercise both sides"
        opts = dict(chunk_size=chunk_size, residual=residual, max_grad_norm=CLIP)
        what = f"depth={depth} b={chunk_size} mom={momentum} forget={forgetting} res={residual}"
        check_chunk_equals_naive(kw, leaves, opts, what)


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_clipped_analytic_backward_equals_autograd(activation, depth):
    """Entered mid-chunk (gradient weights != running weights), gradients of output and state."""
    for momentum, forgetting, residual in FLAGS:
        kw, leaves = make_inputs(T=29, depth=depth, momentum=momentum, forgetting=forgetting, requires_grad=True, seed=depth)
        opts = dict(chunk_size=8, activation=activation, residual=residual, max_grad_norm=CLIP)
        what = f"act={activation} mom={momentum} forget={forgetting} res={residual}"
        check_analytic_backward_equals_autograd(kw, leaves, opts, what)


def test_clipped_streaming_splits_and_steps_equal_one_call():
    kw, _ = make_inputs(T=45, depth=2, seed=3)
    rng = random.Random(0)
    with torch.no_grad():
        y_full, s_full = chunk_memory(**kw, chunk_size=6, max_grad_norm=CLIP)
        for _ in range(3):
            cuts = sorted(rng.sample(range(1, 45), 9))
            ys, state = [], None
            for a, b in zip([0, *cuts], [*cuts, 45]):
                part = {g: kw[g][:, a:b] for g in GATES}
                start = dict(weights=kw["weights"]) if state is None else dict(state=state)
                fn = step_memory if b - a == 1 else chunk_memory
                y, state = fn(**part, **start, chunk_size=6, max_grad_norm=CLIP)
                ys.append(y)
            _close(torch.cat(ys, 1), y_full, 1e-12, f"splits at {cuts}")
            for u, w in zip(state_tensors(state), state_tensors(s_full)):
                _close(u, w, 1e-12, "state after splits")


def test_clip_acts_only_above_the_norm():
    """A bound above every token's norm changes nothing (bit for bit); a small one shrinks every
    update: each token's step is at most theta * max_grad_norm in norm (chunk size 1, no momentum,
    no forgetting, so the step is exactly -theta * scale * u)."""
    kw, _ = make_inputs(T=20, depth=2, momentum=False, forgetting=False, seed=4)
    with torch.no_grad():
        y0, s0 = chunk_memory(**kw, chunk_size=4)
        y1, s1 = chunk_memory(**kw, chunk_size=4, max_grad_norm=1e6)
        assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(s0.tensors(), s1.tensors()))
        y2, _ = chunk_memory(**kw, chunk_size=4, max_grad_norm=0.5)
        assert rel_rms(y2, y0) > 1e-3
        state = None
        for t in range(20):
            part = {g: (kw[g][:, t : t + 1] if kw[g] is not None else None) for g in GATES}
            start = dict(weights=kw["weights"]) if state is None else dict(state=state)
            _, new = step_memory(**part, **start, chunk_size=1, max_grad_norm=0.5)
            before = kw["weights"] if state is None else state.weights
            step_sq = sum((a - b).square().sum((-1, -2)) for a, b in zip(new.weights, before))  # (B, H)
            bound = kw["theta"][:, t] * 0.5
            assert (step_sq.sqrt() <= bound * (1 + 1e-9)).all(), f"token {t}: step above theta * max_grad_norm"
            state = new


def test_clip_keeps_a_sharp_memory_finite():
    """The failure the option exists for: weights and values large enough that the deep memory's
    curvature times theta passes 2. Without the clip the weights blow up; with it they stay finite."""
    kw, _ = make_inputs(T=64, depth=2, momentum=True, forgetting=False, seed=5)
    kw["weights"] = [3 * w for w in kw["weights"]]
    kw["v"] = 10 * kw["v"]
    kw["k"] = kw["k"][:, :1].expand_as(kw["k"]).contiguous()  # one key repeated: every step pushes the same way
    kw["theta"] = torch.full_like(kw["theta"], 0.5)
    with torch.no_grad():
        y, _ = chunk_memory(**kw, chunk_size=4)
        y_clip, s_clip = chunk_memory(**kw, chunk_size=4, max_grad_norm=1.0)
    assert not torch.isfinite(y).all() or y.abs().max() > 1e6, "the unclipped run was meant to diverge"
    assert torch.isfinite(y_clip).all() and all(torch.isfinite(t).all() for t in s_clip.tensors())
    assert y_clip.abs().max() < 1e3


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_max_grad_norm(bad):
    kw, _ = make_inputs(T=5)
    err = TypeError if isinstance(bad, (bool, str)) else ValueError
    for fn in (chunk_memory, naive_memory):
        with pytest.raises(err, match="max_grad_norm"):
            fn(**kw, max_grad_norm=bad)
    one = {g: (kw[g][:, :1] if g in GATES and kw[g] is not None else kw[g]) for g in kw}
    with pytest.raises(err, match="max_grad_norm"):
        step_memory(**one, max_grad_norm=bad)
