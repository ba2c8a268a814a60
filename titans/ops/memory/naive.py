"""The token-by-token reference of docs/design.md §1. Ground truth for every test; kept simple.

Per token t (gradients at the chunk-start weights M_c, everything else token by token):

    u_t = grad_W loss(M_c(k_t) - v_t)      (the paper: ||.||^2; objectives.py for others)
    S_t = eta_t * S_{t-1} - theta_t * u_t
    M_t = (1 - alpha_t) * M_{t-1} + S_t
    y_t = M_t(q_t)

With ``retention_kl`` (Memora) the update is MIRAS eq. 27 at a chunk's first token and the papers'
linear approximation at the others (eqs. 30-32; see ``naive_memory``). With ``muon_steps = k``
(ATLAS's Muon, eqs. 32-33) the momentum is the raw gradient sum and the step its Newton-Schulz
orthogonalisation: ``S_t = eta_t S_{t-1} - u_t``, ``M_t = (1 - alpha_t) M_{t-1} + theta_t NS_k(S_t)``.

The per-token gradient is taken with ``torch.func.grad`` (autograd), independently of the
analytic gradients of the chunk path. Every token's weights stay alive for the backward pass,
so use it on short sequences only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .mlp import activation
from .muon import newton_schulz
from .objectives import Objective, as_objective
from .state import (
    MemoryState, MemoryWindow, check_inputs, compute_dtype, full_precision, initial_memory_state, kl_simplex, lq_scale,
    next_window, window_tokens,
)  # fmt: skip

__all__ = ["naive_memory"]


def _mlp(weights: Sequence[Tensor], x: Tensor, act: str, residual: bool) -> Tensor:
    """M_W(x) with weights ``[B, H, out, in]`` and x ``[B, H, D]``."""
    h = x
    for i, w in enumerate(weights):
        z = torch.einsum("bhoi,bhi->bho", w, h)
        h = activation(act, z) if i < len(weights) - 1 else z
    return h + x if residual else h


@full_precision
def naive_memory(
    *,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor | None = None,
    alpha: Tensor | None = None,
    weights: Sequence[Tensor] | None = None,
    state: MemoryState | None = None,
    chunk_size: int = 64,
    activation: str = "silu",
    residual: bool = False,
    max_grad_norm: float | None = None,
    objective: Objective | str | None = None,
    delta: Tensor | None = None,
    retention_q: float | None = None,
    gamma: Tensor | None = None,
    retention_kl: float | None = None,
    muon_steps: int | None = None,
) -> tuple[Tensor, MemoryState]:
    """Token loop. q, k, v ``[B, T, H, D]``; theta, eta, alpha ``[B, T, H]`` (eta / alpha = None:
    no momentum / no forgetting). Start from ``weights`` (M_0, per layer ``[H, out, in]`` or
    ``[B, H, out, in]``) or continue from ``state``. ``max_grad_norm``: scale a token's learning
    rate by ``min(1, max_grad_norm / |u_t|)``, ``|u_t|`` the norm of its whole gradient (all layers).
    ``objective``: the loss of the memory's error (objectives.py; default the paper's l2), with
    its per-token threshold ``delta`` ``[B, T, H]`` when it takes one. ``retention_q``: Moneta's
    l_q retention (MIRAS eq. 24): the state's weights are an accumulator ``A``, read and written
    as ``A / ||A||_q^(q-2)`` with the norm of the chunk-start accumulator (the papers' chunk
    approximation; at chunk_size 1 a token's gradient is exactly eq. 24's, its read uses the norm
    before its own write). ``gamma`` ``[B, T, H, c]``: the Omega rule (ATLAS eq. 9-10): token t's
    update is ``sum_j gamma[t, j] u_{t-j}`` over the c latest tokens (j = 0 the token itself), each
    ``u`` taken at the chunk-start weights and clipped on its own; the state keeps the last c - 1
    tokens (``MemoryWindow``). ``retention_kl = c``: Memora (MIRAS eqs. 19-21, 27), no momentum;
    ``weights`` are logits and the memory starts at ``c softmax`` of each of their rows. The
    state's ``log_weights`` Z take ``Z = (1 - alpha) Z - theta u`` at every token; a chunk's first
    token (the lag token, eq. 30) sets the weights to ``c softmax(Z)`` row by row (eq. 27 exactly),
    the chunk's other tokens take their gradients there and move the weights that reads use
    linearly, ``W = (1 - alpha) W - theta u`` (eqs. 31-32); at the chunk's end the weights are
    ``c softmax(Z)`` again. At chunk_size 1 every token is a lag token: eq. 27 itself.
    ``muon_steps = k``: ATLAS's Muon (eqs. 32-33; ``muon.py``): ``S_t = eta_t S_{t-1} - u_t`` (no
    theta: the momentum sums the windowed, clipped gradients themselves; ``S_t = -u_t`` with eta
    None) and ``M_t = (1 - alpha_t) M_{t-1} + theta_t NS_k(S_t)``, ``NS_k`` k Newton-Schulz steps on
    each layer's ``[out, in]`` matrix of each memory. Returns ``(y [B, T, H, D], final state)``."""
    objective = as_objective(objective)
    check_inputs(q, k, v, theta, eta, alpha, weights, state, chunk_size, activation, max_grad_norm=max_grad_norm,
                 objective=objective, delta=delta, retention_q=retention_q, gamma=gamma, residual=residual,
                 retention_kl=retention_kl, muon_steps=muon_steps)  # fmt: skip
    dtype = q.dtype
    cd = compute_dtype(dtype)
    if state is None:
        state = initial_memory_state(weights, q.shape[0], momentum=eta is not None, dtype=cd, retention_kl=retention_kl,
                                     muon_steps=muon_steps)
    W, Wc, pos = state.weights, state.chunk_weights, state.position
    S, Z = state.momentum, state.log_weights
    if S is None and eta is not None:
        S = tuple(torch.zeros_like(w) for w in W)
    q, k, v, theta = q.to(cd), k.to(cd), v.to(cd), theta.to(cd)
    B, T, H, D = q.shape
    c = 1 if gamma is None else gamma.shape[-1]
    d_cd = None if delta is None else delta.to(cd)
    # the c - 1 tokens before the call, then the call's: kk[:, c - 1 + t] is token t ([B, c-1+T, H, ...])
    flat = lambda x: None if x is None else x.transpose(1, 2).reshape(B * H, x.shape[1], *x.shape[3:])  # noqa: E731
    kk, vv, dd, valid = window_tokens(state.window, c, flat(k), flat(v), flat(d_cd))
    unflat = lambda x: None if x is None else x.reshape(B, H, *x.shape[1:]).transpose(1, 2)  # noqa: E731
    kk, vv, dd = unflat(kk), unflat(vv), unflat(dd)

    def loss(ws, k_t, v_t, d_t):  # summed over batch and heads: each memory gets its own gradient
        return objective.loss(_mlp(ws, k_t, activation, residual) - v_t, d_t).sum()

    grad_fn = torch.func.grad(loss)
    ys = []
    for t in range(q.shape[1]):
        if pos == 0:
            Wc = W
        s = 1.0 if retention_q is None else lq_scale(Wc, retention_q)[:, :, None, None]  # (B, H, 1, 1)
        u = None
        for j in range(c):  # the window's tokens t - j, each gradient at Wc and clipped on its own
            if t - j < -valid:
                break  # before the stream began
            i = c - 1 + t - j
            g = grad_fn(tuple(w / s for w in Wc), kk[:, i], vv[:, i], None if dd is None else dd[:, i])
            if max_grad_norm is not None:
                sq = sum(x.square().sum((-1, -2)) for x in g)  # (B, H): |u|^2
                c2 = max_grad_norm**2
                clip = torch.where(sq > c2, max_grad_norm * sq.clamp_min(c2).rsqrt(), torch.ones_like(sq))
                g = tuple(x * clip[:, :, None, None] for x in g)
            if gamma is not None:
                g = tuple(x * gamma[:, t, :, j, None, None].to(cd) for x in g)
            u = g if u is None else tuple(a + b for a, b in zip(u, g))
        th = theta[:, t, :, None, None]
        if retention_kl is not None:  # Memora: the lag token exact, the chunk's others linear in W
            keep = 1 if alpha is None else 1 - alpha[:, t, :, None, None].to(cd)
            Z = tuple(keep * z - th * g for z, g in zip(Z, u))
            if pos == 0:
                Z, W = kl_simplex(Z, retention_kl)
                Wc = W
            else:
                W = tuple(keep * w - th * g for w, g in zip(W, u))
            ys.append(_mlp(W, q[:, t], activation, residual))
            pos = (pos + 1) % chunk_size
            if pos == 0:  # the chunk's end: back on the simplex
                Z, W = kl_simplex(Z, retention_kl)
            continue
        if muon_steps is not None:  # ATLAS: the momentum of the raw gradients, orthogonalised, times theta
            if eta is not None:
                et = eta[:, t, :, None, None].to(cd)
                S = tuple(et * s - g for s, g in zip(S, u))
            direction = S if eta is not None else tuple(-g for g in u)
            step = tuple(th * newton_schulz(m, muon_steps) for m in direction)
        elif eta is not None:
            et = eta[:, t, :, None, None].to(cd)
            S = tuple(et * s - th * g for s, g in zip(S, u))
            step = S
        else:
            step = tuple(-th * g for g in u)
        if alpha is not None:
            keep = 1 - alpha[:, t, :, None, None].to(cd)
            W = tuple(keep * w + s for w, s in zip(W, step))
        else:
            W = tuple(w + s for w, s in zip(W, step))
        ys.append(_mlp(tuple(w / s for w in W), q[:, t], activation, residual))
        pos = (pos + 1) % chunk_size
    y = torch.stack(ys, dim=1).to(dtype)
    window = next_window(flat(kk), flat(vv), flat(dd), valid, c)
    if window is not None:  # back to [B, H, c - 1, ...]
        split = lambda x: None if x is None else x.reshape(B, H, *x.shape[1:])  # noqa: E731
        window = MemoryWindow(split(window.k), split(window.v), split(window.delta), window.valid)
    final = MemoryState(
        weights=tuple(W),
        momentum=None if eta is None else tuple(S),
        chunk_weights=tuple(W) if pos == 0 else tuple(Wc),
        position=pos,
        window=window,
        log_weights=None if Z is None else tuple(Z),
        muon_steps=muon_steps,
    )
    return y, final
