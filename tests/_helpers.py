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


def probe_loss(y: torch.Tensor) -> torch.Tensor:
    """A fixed, non-symmetric scalar function of the output, so every gradient is exercised."""
    w = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device).view_as(y) * 0.37)
    return (y * w).sum()


def state_tensors(state) -> list[torch.Tensor]:
    out = list(state.weights) + list(state.chunk_weights)
    return out + (list(state.momentum) if state.momentum is not None else [])
