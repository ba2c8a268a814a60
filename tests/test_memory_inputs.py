"""Bad input fails loudly, naming the argument, on every path."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_inputs

from titans.ops.memory import MemoryState, chunk_memory, naive_memory, step_memory

PATHS = [chunk_memory, naive_memory]


def _kw(T=5, **over):
    kw, _ = make_inputs(T=T, seed=0)
    kw.update(over)
    return kw


@pytest.mark.parametrize("fn", PATHS)
@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda kw: kw.update(q=kw["q"][0]), ValueError, "q must have 4 dimensions"),
        (lambda kw: kw.update(k=kw["k"][:, :, :1]), ValueError, "share the shape"),
        (lambda kw: kw.update(v=kw["v"].float()), TypeError, "v has dtype"),
        (lambda kw: kw.update(q=kw["q"].long()), TypeError, "q must be a floating-point"),
        (lambda kw: kw.update(theta=kw["theta"][..., :1]), ValueError, "theta must have shape"),
        (lambda kw: kw.update(alpha=kw["alpha"][:, :, :, None]), ValueError, "alpha must have 3"),
        (lambda kw: kw.update(theta=None), ValueError, "theta"),
        (lambda kw: kw.update(q=kw["q"].index_fill(1, torch.tensor([2]), float("nan"))), ValueError, "non-finite values .* q"),
        (lambda kw: kw.update(v=kw["v"].index_fill(1, torch.tensor([0]), float("inf"))), ValueError, "non-finite values .* v"),
        (lambda kw: kw.update(theta=-kw["theta"] - 0.1), ValueError, "theta .* must be >= 0"),
        (lambda kw: kw.update(eta=kw["eta"] + 1.5), ValueError, "eta must lie in"),
        (lambda kw: kw.update(alpha=kw["alpha"] - 1.0), ValueError, "alpha must lie in"),
        (lambda kw: kw.update(weights=[w[:, :2] for w in kw["weights"]]), ValueError, "memory layer|expected head dim"),
        (lambda kw: kw.update(weights=[kw["weights"][0][:1]] + kw["weights"][1:]), ValueError, r"weights\[0\] must have shape"),
        (lambda kw: kw.update(weights=kw["weights"][0]), TypeError, "weights must be a non-empty list"),
        (lambda kw: kw.update(weights=None), ValueError, "exactly one of weights"),
        (lambda kw: kw.update(q=kw["q"][:, :0], k=kw["k"][:, :0], v=kw["v"][:, :0], theta=kw["theta"][:, :0], eta=kw["eta"][:, :0], alpha=kw["alpha"][:, :0]), ValueError, "empty time dimension"),
    ],
)  # fmt: skip
def test_bad_inputs(fn, change, exc, match):
    kw = _kw()
    change(kw)
    with pytest.raises(exc, match=match):
        fn(**kw, chunk_size=4)


@pytest.mark.parametrize("fn", PATHS + [step_memory])
@pytest.mark.parametrize("chunk_size, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_chunk_size(fn, chunk_size, exc):
    with pytest.raises(exc, match="chunk_size"):
        fn(**_kw(T=1), chunk_size=chunk_size)


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        chunk_memory(**_kw(), chunk_size=4, activation="tanh")


def test_step_takes_one_token():
    with pytest.raises(ValueError, match="exactly one token"):
        step_memory(**_kw(T=3), chunk_size=4)


def test_state_mismatches():
    kw = _kw(T=6)
    weights = kw.pop("weights")
    _, state = chunk_memory(**kw, weights=weights, chunk_size=4)
    assert state.position == 2
    with pytest.raises(ValueError, match="another chunk_size"):
        chunk_memory(**kw, state=state, chunk_size=2)
    with pytest.raises(ValueError, match="exactly one of"):
        chunk_memory(**kw, state=state, weights=weights, chunk_size=4)
    with pytest.raises(TypeError, match="MemoryState"):
        chunk_memory(**kw, state={"weights": weights}, chunk_size=4)
    small = MemoryState(
        weights=tuple(w[:1] for w in state.weights),
        momentum=tuple(s[:1] for s in state.momentum),
        chunk_weights=tuple(w[:1] for w in state.chunk_weights),
        position=state.position,
    )
    with pytest.raises(ValueError, match=r"state.weights\[0\] must have shape \[B=2"):
        chunk_memory(**kw, state=small, chunk_size=4)


def test_compile_needs_analytic_backward():
    with pytest.raises(ValueError, match="compile=True needs backward='analytic'"):
        chunk_memory(**_kw(), chunk_size=4, backward="autograd", compile=True)


def test_bad_backward_mode():
    with pytest.raises(ValueError, match="backward"):
        chunk_memory(**_kw(), chunk_size=4, backward="numeric")


@pytest.mark.parametrize("name", ["v", "theta"])
def test_device_mismatch(name):
    """The 'meta' device stands in for a second device: the check runs before any compute."""
    kw = _kw()
    kw[name] = kw[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta"):
        chunk_memory(**kw, chunk_size=4)


def test_memory_ops_ignore_an_enclosing_autocast_region():
    """Under bf16 autocast the memory's recurrence still runs in float32 and matches exactly."""
    import torch

    from titans.ops.memory import chunk_memory, step_memory

    g = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 20, 2, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    theta, eta, alpha = (torch.rand(B, T, H, generator=g) * 0.1 for _ in range(3))
    weights = tuple(torch.randn(H, o, i, generator=g) * 0.1 for o, i in ((32, 8), (8, 32)))
    kw = dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, weights=weights, chunk_size=8)
    y, _ = chunk_memory(**kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, _ = chunk_memory(**kw)
        y_step, _ = step_memory(**{**kw, "q": q[:, :1], "k": k[:, :1], "v": v[:, :1], "theta": theta[:, :1],
                                   "eta": eta[:, :1], "alpha": alpha[:, :1], "chunk_size": 1})
    assert y_ac.dtype == torch.float32 and torch.equal(y, y_ac)
    assert y_step.dtype == torch.float32


def test_nonfinite_names_exactly_the_tensors_with_nan_or_inf():
    """The finiteness check behind every input check: a sum per tensor, and the exact elementwise
    check only where a sum is not finite, so finite values whose sum overflows are not refused."""
    from titans.ops.tensors import nonfinite

    big = torch.full((4,), 3e38)  # finite; its float32 sum overflows to inf
    both = torch.tensor([1.0, float("inf"), -float("inf")])  # the infinities cancel to NaN in a sum
    named = {
        "ok": torch.randn(3, 5), "big": big, "nan": torch.tensor([0.0, float("nan")]), "both": both,
        "bf16": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16),
        "bf16_big": torch.full((8,), 3e38, dtype=torch.bfloat16), "f64": torch.tensor([-float("inf")], dtype=torch.float64),
        "empty": torch.empty(0), "complex": torch.tensor([1 + 2j, complex(1.0, float("nan"))]),
    }  # fmt: skip
    assert nonfinite(named) == ["nan", "both", "bf16", "f64", "complex"]
    assert nonfinite({"ok": torch.randn(7), "big": big}) == []
    assert nonfinite({}) == []
