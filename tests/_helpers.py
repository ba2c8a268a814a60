"""Shared test helpers: random memory inputs and comparisons."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titans.ops.memory import memory_shapes


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS difference of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def make_inputs(
    B=2, T=37, H=2, D=4, depth=2, expansion=2.0, momentum=True, forgetting=True,
    dtype=torch.float64, seed=0, requires_grad=False, batched_weights=False,
):  # fmt: skip
    """Random q, k, v (unit-norm q and k, as the layer makes them), gates in their ranges, and
    initial memory weights. Returns ``(kwargs, leaves)`` with the leaves to differentiate."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    q = F.normalize(rnd(B, T, H, D), dim=-1)
    k = F.normalize(rnd(B, T, H, D), dim=-1)
    v = rnd(B, T, H, D)
    theta = 0.1 * torch.rand(B, T, H, generator=g, dtype=dtype)
    eta = 0.9 * torch.rand(B, T, H, generator=g, dtype=dtype) if momentum else None
    alpha = 0.3 * torch.rand(B, T, H, generator=g, dtype=dtype) if forgetting else None
    lead = (B, H) if batched_weights else (H,)
    weights = [rnd(*lead, o, i) / i**0.5 for o, i in memory_shapes(D, depth, expansion)]
    kwargs = dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, weights=weights)
    leaves = [q, k, v, theta] + [t for t in (eta, alpha) if t is not None] + weights
    if requires_grad:
        for t in leaves:
            t.requires_grad_(True)
    return kwargs, leaves


def step_tokens(kw: dict, **opts):
    """``step_memory`` over ``kw``'s tokens one at a time from its initial weights (per-token
    tensors: q, k, v and the gates present): ``(y [B, T, H, D], final state)``."""
    from titans.ops.memory import step_memory

    per_token = {n: kw[n] for n in ("q", "k", "v", "theta", "eta", "alpha", "delta") if kw.get(n) is not None}
    state, ys = None, []
    for t in range(kw["q"].shape[1]):
        token = {n: x[:, t : t + 1] for n, x in per_token.items()}
        start = dict(weights=kw["weights"]) if state is None else dict(state=state)
        y, state = step_memory(**token, **start, **opts)
        ys.append(y)
    return torch.cat(ys, 1), state


def probe_loss(y: torch.Tensor) -> torch.Tensor:
    """A fixed, non-symmetric scalar function of the output, so every gradient is exercised."""
    w = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device).view_as(y) * 0.37)
    return (y * w).sum()


def state_tensors(state) -> list[torch.Tensor]:
    out = list(state.weights) + list(state.chunk_weights)
    out += list(state.log_weights) if state.log_weights is not None else []
    return out + (list(state.momentum) if state.momentum is not None else [])


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    err = rel_rms(a, b)
    assert err < tol, f"{what}: relative RMS {err:.3e} >= {tol:.0e}"


def _probe_all(y, state) -> torch.Tensor:
    """Output and every tensor of the final state, so their gradients are all checked."""
    return probe_loss(y) + sum(probe_loss(t) for t in state.tensors())


def check_layer_streams_in_pieces(layer, x: torch.Tensor, cut: int = 7):
    """A memory layer over x ``[B, T, dim]`` in one call and in two pieces (after ``cut`` tokens):
    outputs and final state to 1e-12. Returns ``(y, state, the first piece's state, the second
    piece's outputs)``."""
    y, s = layer(x)
    y1, s1 = layer(x[:, :cut])
    y2, s2 = layer(x[:, cut:], s1)
    assert_close(torch.cat([y1, y2], 1), y, 1e-12, "two pieces against one call")
    for a, b in zip(s2.memory.tensors(), s.memory.tensors()):
        assert_close(a, b, 1e-12, "final state")
    return y, s, s1, y2


def check_chunk_equals_naive(kw, leaves, opts: dict, what: str):
    """``chunk_memory`` against ``naive_memory`` on the same inputs and options: outputs and
    final state to 1e-10, every gradient (of the output and the whole final state) to 1e-9.
    Returns ``(state, reference state)`` for further checks."""
    from titans.ops.memory import chunk_memory, naive_memory

    y_ref, s_ref = naive_memory(**kw, **opts)
    y, s = chunk_memory(**kw, **opts)
    assert torch.isfinite(y_ref).all(), f"reference diverged ({what}): inputs too aggressive"
    assert_close(y, y_ref, 1e-10, f"output ({what})")
    for a, b in zip(state_tensors(s), state_tensors(s_ref)):
        assert_close(a, b, 1e-10, f"final state ({what})")
    g_ref = torch.autograd.grad(_probe_all(y_ref, s_ref), leaves)
    g = torch.autograd.grad(_probe_all(y, s), leaves)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, b, 1e-9, f"gradient of leaf {i} ({what})")
    return s, s_ref


def check_analytic_backward_equals_autograd(kw, leaves, opts: dict, what: str) -> None:
    """The chunk path's hand-derived backward against autograd through the same forward, the
    state entered mid-chunk (a 5-token call, then the rest: gradient weights != running weights),
    gradients of the outputs and the final state, to 1e-10."""
    from titans.ops.memory import chunk_memory

    kw = dict(kw)
    weights = kw.pop("weights")
    head = {k: (v[:, :5] if v is not None else None) for k, v in kw.items()}
    tail = {k: (v[:, 5:] if v is not None else None) for k, v in kw.items()}
    grads = []
    for mode in ("autograd", "analytic"):
        y1, s = chunk_memory(**head, weights=weights, backward=mode, **opts)
        y2, s = chunk_memory(**tail, state=s, backward=mode, **opts)
        grads.append(torch.autograd.grad(_probe_all(torch.cat([y1, y2], 1), s), leaves))
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(b, a, 1e-10, f"grad {i} ({what})")



def check_setting_keeps_states_apart(setting: str, value, **small) -> None:
    """A model with the later-added memory ``setting`` (``TitansConfig`` field) at ``value`` names it
    in its state fingerprint; one at the default does not name it at all (as before it existed, so
    its saved states still load); neither model continues the other's state. ``small``: the rest
    of both configs. The refusal names the setting and both sides' values."""
    import re

    import pytest

    from titans.errors import StateMismatchError
    from titans.model import TitansConfig, TitansLM

    plain, other = (TitansLM(TitansConfig(**small, **extra)).eval() for extra in ({}, {setting: value}))
    assert setting not in plain.state_fingerprint() and f"{setting}={value}" in other.state_fingerprint()
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        for a, b in ((plain, other), (other, plain)):
            state = a(ids)[2]
            in_state, in_model = (str(value), "None") if a is other else ("None", str(value))
            named = rf"another model layout \({setting}: state {re.escape(in_state)}, model {re.escape(in_model)}\)"
            with pytest.raises(StateMismatchError, match=named):
                b(ids, state=state)


def memora_inputs(theta_scale: float, T: int = 256, seed: int = 0) -> dict:
    """``make_inputs`` for Memora's approximation measurements (``memora_gap``): B=2, 2 heads of 8,
    depth 2, expansion 2, no momentum; theta uniform in [0, 2 theta_scale], the forget gate alpha
    in [0, 0.01]; float64, no gradients."""
    kw, _ = make_inputs(B=2, T=T, H=2, D=8, depth=2, expansion=2.0, momentum=False, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    kw["theta"] = 2 * theta_scale * torch.rand(kw["theta"].shape, generator=g, dtype=torch.float64)
    kw["alpha"] = 0.01 * torch.rand(kw["alpha"].shape, generator=g, dtype=torch.float64)
    return kw


def memora_gap(theta_scale: float, chunk_sizes=(1, 4, 16, 64), T: int = 256, seed: int = 0) -> dict:
    """How far the chunk path's Memora (``retention_kl=1``, the papers' chunk approximation) is from
    the exact rule (the token loop at chunk size 1, MIRAS eq. 27) on ``memora_inputs``: for each
    chunk size, the relative RMS of the outputs and of the final weights (None when the stream
    ends inside a chunk); and under ``"writes"``, how far the writes move the exact rule's outputs
    at all (against the same stream with theta = 0)."""
    from titans.ops.memory import chunk_memory, naive_memory

    kw = memora_inputs(theta_scale, T, seed)
    flat = lambda ws: torch.cat([w.flatten() for w in ws])  # noqa: E731
    with torch.no_grad():
        y_ref, s_ref = naive_memory(**kw, chunk_size=1, retention_kl=1.0)
        y_still, _ = naive_memory(**dict(kw, theta=torch.zeros_like(kw["theta"])), chunk_size=1, retention_kl=1.0)
        out = {"writes": rel_rms(y_still, y_ref)}
        for b in chunk_sizes:
            y, s = chunk_memory(**kw, chunk_size=b, retention_kl=1.0)
            out[b] = (rel_rms(y, y_ref), rel_rms(flat(s.weights), flat(s_ref.weights)) if s.position == 0 else None)
    return out
