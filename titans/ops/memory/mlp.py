"""The memory MLP, its activation with an explicit derivative, and the analytic per-token gradient
of the associative loss ``l(W; k, v) = ||M_W(k) - v||^2``.

Layers: ``z_l = h_{l-1} @ W_l.T``, ``h_l = act(z_l)`` for l < L, no activation after the last
layer, optional residual ``M(x) = z_L + x``. Weights are batched as ``[N, out, in]`` (N = any
number of independent memories, e.g. batch x heads) and inputs as ``[N, n, in]``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation(name: str, z: Tensor) -> Tensor:
    if name == "silu":
        return F.silu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "relu":
        return F.relu(z)
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(name: str, z: Tensor) -> Tensor:
    """d act / d z, written out so that it is itself differentiable (outer gradients need it)."""
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "gelu":  # exact (erf) GELU: Phi(z) + z * phi(z)
        return 0.5 * (1 + torch.erf(z / _SQRT_2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if name == "relu":
        return (z > 0).to(z.dtype)
    raise ValueError(f"unknown activation {name!r}")


def activation_with_grads(name: str, z: Tensor, second: bool = False):
    """(act(z), act'(z), act''(z) or None), sharing their common parts (one sigmoid for SiLU)."""
    if name == "silu":  # in-place steps on fresh buffers: fewer [n, E] temporaries
        s = torch.sigmoid(z)
        a = z * s
        d1 = (z - a).add_(1).mul_(s)  # s (1 + z (1 - s))
        d2 = torch.add(z, a, alpha=-2).add_(2).mul_(s).mul_(1 - s) if second else None  # s (1 - s) (2 + z (1 - 2 s))
        return a, d1, d2
    if name == "gelu":
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        cdf = 0.5 * (1 + torch.erf(z / _SQRT_2))
        return z * cdf, cdf + z * pdf, (pdf * (2 - z * z) if second else None)
    if name == "relu":
        d1 = (z > 0).to(z.dtype)
        return z * d1, d1, (torch.zeros_like(z) if second else None)
    raise ValueError(f"unknown activation {name!r}")


def mlp_forward(weights: Sequence[Tensor], x: Tensor, act: str, residual: bool) -> Tensor:
    """M_W(x) for x ``[N, n, D]`` and weights ``[N, out, in]``."""
    h = x
    for i, w in enumerate(weights):
        z = h @ w.transpose(-1, -2)
        h = activation(act, z) if i < len(weights) - 1 else z
    return h + x if residual else h


class _MLPRead(torch.autograd.Function):
    """``mlp_forward`` as one node that saves only its input and weights; the backward recomputes
    the pre-activations (one product per layer) instead of autograd keeping two ``[N, n, hidden]``
    tensors per layer alive until the backward pass."""

    @staticmethod
    def forward(ctx, act: str, residual: bool, x: Tensor, *weights: Tensor) -> Tensor:
        ctx.act, ctx.residual = act, residual
        ctx.save_for_backward(x, *weights)
        return mlp_forward(weights, x, act, residual)

    @staticmethod
    @once_differentiable  # double backward raises instead of being silently wrong
    def backward(ctx, g: Tensor):
        x, *weights = ctx.saved_tensors
        mT = lambda t: t.transpose(-1, -2)
        hs, d1s = [x], []
        for w in weights[:-1]:
            a, d1, _ = activation_with_grads(ctx.act, hs[-1] @ mT(w))
            hs.append(a), d1s.append(d1)
        gws, gz = [None] * len(weights), g
        for l in reversed(range(len(weights))):
            gws[l] = mT(gz) @ hs[l]
            gh = gz @ weights[l]
            gz = gh.mul_(d1s[l - 1]) if l > 0 else gh
        gx = gz.add_(g) if ctx.residual else gz
        return (None, None, gx, *gws)


def mlp_read(weights: Sequence[Tensor], x: Tensor, act: str, residual: bool) -> Tensor:
    """``mlp_forward`` (first-order differentiable) with a training memory of its input and
    weights only: for reads whose activations would otherwise be held until the backward pass.
    Double backward raises; use ``mlp_forward`` for that. Under autocast it is ``mlp_forward``
    (the recomputing backward runs outside the autocast region, in other dtypes)."""
    needs_grad = x.requires_grad or any(w.requires_grad for w in weights)
    if torch.is_grad_enabled() and needs_grad and not torch.is_autocast_enabled(x.device.type):
        return _MLPRead.apply(act, residual, x, *weights)
    return mlp_forward(weights, x, act, residual)


def key_gradients(
    weights: Sequence[Tensor], k: Tensor, v: Tensor, act: str, residual: bool, objective=None, delta=None
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per-token gradients of ``||M_W(k_i) - v_i||^2`` at ``weights``, in factored form (or of
    another ``objective``'s loss, with its per-token ``delta`` ``[N, n]``: see objectives.py).

    Returns ``(hs, zs, dzs)`` with ``hs[l]`` the input of layer l (``[N, n, in_l]``), ``zs[l]`` its
    pre-activation and ``dzs[l]`` the loss gradient there (``[N, n, out_l]``): token i's gradient
    for layer l is the
    outer product ``dzs[l][:, i, :, None] * hs[l][:, i, None, :]``. One batched forward/backward,
    no per-sample autograd.
    """
    # act and act' share their work (one sigmoid for SiLU), in place on fresh buffers: this runs
    # once per chunk and its [n, hidden] passes are a good part of a chunk's memory traffic.
    hs, zs, d1s = [k], [], []
    for i, w in enumerate(weights):
        z = hs[-1] @ w.transpose(-1, -2)
        zs.append(z)
        if i < len(weights) - 1:
            h, d1, _ = activation_with_grads(act, z)
            hs.append(h), d1s.append(d1)
    out = zs[-1] + k if residual else zs[-1]
    dz = torch.sub(out, v).mul_(2) if objective is None or objective.name == "l2" else objective.grad(out - v, delta)
    dzs = [dz]
    for i in range(len(weights) - 1, 0, -1):
        dz = (dz @ weights[i]).mul_(d1s[i - 1])
        dzs.append(dz)
    dzs.reverse()
    return hs, zs, dzs


def clip_scale(dzs: Sequence[Tensor], hs: Sequence[Tensor], max_norm: float) -> tuple[Tensor, Tensor]:
    """Per-token factor ``min(1, max_norm / |u_t|)`` on the learning rate, where ``u_t`` is the
    token's whole inner gradient (every layer, Frobenius norm) in the factored form of
    ``key_gradients``: ``|u_t|^2 = sum_l |dz_t(l)|^2 |h_t(l)|^2`` (an outer product's norm is the
    product of its factors' norms). Returns ``(scale, sq)``, both ``[N, n]``, sq = ``|u_t|^2``.

    Written so that its derivative is finite everywhere (no square root of 0 on any path)."""
    sq = sum(dz.square().sum(-1) * h.square().sum(-1) for dz, h in zip(dzs, hs))
    c2 = max_norm * max_norm
    scale = torch.where(sq > c2, max_norm * sq.clamp_min(c2).rsqrt(), torch.ones_like(sq))
    return scale, sq

