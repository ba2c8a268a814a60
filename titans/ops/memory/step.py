"""One-token update for decoding: the body of the token loop with analytic gradients.

Same signature and results as ``naive_memory`` / ``chunk_memory`` with T = 1, but it touches
each weight once (one rank-1 update per layer), so decoding costs O(1) per token.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .mlp import clip_scale, key_gradients, mlp_forward
from .muon import newton_schulz
from .objectives import L2, Objective, as_objective
from .state import (
    full_precision,
    MemoryState,
    check_inputs,
    compute_dtype,
    initial_memory_state,
    kl_simplex,
    lq_scale,
    next_window,
    state_from_flat,
    window_tokens,
    window_weights,
)

__all__ = ["kl_step_flat", "step_memory", "step_flat"]


def step_flat(
    W: Sequence[Tensor],
    Wc: Sequence[Tensor],
    S: Sequence[Tensor] | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor | None,
    alpha: Tensor | None,
    activation: str,
    residual: bool,
    max_grad_norm: float | None,
    objective: Objective = L2,
    delta: Tensor | None = None,
    retention_q: float | None = None,
    mix: Tensor | None = None,
    muon_steps: int | None = None,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...] | None]:
    """The update itself, unchecked, on flat memories: weights ``[N, out, in]`` (N = batch x
    heads; ``Wc`` the pending chunk's start weights, where the gradient is taken), the query
    ``[N, 1, D]``, gates ``[N, 1, 1]``, ``S`` None for a zero momentum (or without momentum, when
    ``eta`` is None); ``delta`` ``[N, m]`` the objective's threshold (when it takes one);
    ``retention_q``: W, Wc, S are Moneta's accumulators, used divided by ``lq_scale(Wc)``.
    k, v ``[N, m, D]``: the token itself (m = 1), or with the Omega rule its window (the c - 1
    tokens before it, then it; m = c) weighted by ``mix`` ``[N, m]``: the update's gradient is
    ``sum_i mix_i u_i``, each ``u_i`` clipped on its own. ``muon_steps = k``: ATLAS's Muon,
    ``S = eta S - u`` and ``W = (1 - alpha) W + theta NS_k(S)`` (``muon.py``). Returns
    ``(y [N, 1, D], W, S)``; no Python branch depends on values, so the one-token decode graph of
    ``TitansLM`` traces it as it is."""
    if retention_q is not None:  # everything below is linear in the accumulators: scale in, scale out
        s = lq_scale(Wc, retention_q)[:, None, None]  # (N, 1, 1)
        y, W, S = step_flat(
            tuple(w / s for w in W), tuple(w / s for w in Wc), None if S is None else tuple(m / s for m in S),
            q, k, v, theta / s, eta, alpha, activation, residual, max_grad_norm, objective, delta, None, mix,
        )  # fmt: skip
        return y, tuple(w * s for w in W), None if S is None else tuple(m * s for m in S)
    hs, _, dzs = key_gradients(Wc, k, v, activation, residual, objective, delta)
    th, coef = theta, mix  # coef [N, m]: each key token's weight in the update (None: 1)
    if max_grad_norm is not None:
        scale = clip_scale(dzs, hs, max_grad_norm)[0]  # (N, m)
        coef = scale if coef is None else coef * scale
    if coef is not None:
        dzs = [dz * coef.unsqueeze(-1) for dz in dzs]
    u = [dz.transpose(-1, -2) @ h for dz, h in zip(dzs, hs)]  # sum over the key tokens of rank-1 gradients
    if muon_steps is not None:  # ATLAS: theta scales the orthogonalised momentum of the raw gradients
        direction = tuple(-g for g in u) if S is None else tuple(eta * s - g for s, g in zip(S, u))
        S = None if eta is None else direction
        step = tuple(th * newton_schulz(m, muon_steps) for m in direction)
    elif eta is not None:
        S = tuple(-th * g for g in u) if S is None else tuple(eta * s - th * g for s, g in zip(S, u))
        step = S
    else:
        S, step = None, tuple(-th * g for g in u)
    keep = None if alpha is None else 1 - alpha
    W = tuple((w if keep is None else keep * w) + s for w, s in zip(W, step))
    return mlp_forward(W, q, activation, residual), W, S


def _when(flag: bool | Tensor, then: Callable[[], tuple], otherwise: Callable[[], tuple]) -> tuple:
    """``then()`` where ``flag`` holds, else ``otherwise()`` (tuples of tensors): a Python branch
    for a bool; for a 0-dim bool tensor (the decode graph, which has no Python branch on the
    state) both are computed and chosen elementwise."""
    if isinstance(flag, bool):
        return then() if flag else otherwise()
    return tuple(torch.where(flag, a, b) for a, b in zip(then(), otherwise()))


def kl_step_flat(
    W: Sequence[Tensor],
    Wc: Sequence[Tensor],
    Z: Sequence[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    alpha: Tensor | None,
    activation: str,
    residual: bool,
    max_grad_norm: float | None,
    objective: Objective,
    delta: Tensor | None,
    scale: float,
    lag: bool | Tensor,
    end: bool | Tensor,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One token of Memora (``retention_kl = scale``), unchecked, on flat memories ``[N, out, in]``.

    MIRAS eq. 27 (with eq. 21's scale c): every row of every layer becomes
    ``W = c softmax(a log W - theta u)``, ``a = 1 - alpha`` (eq. 27's alpha_t, eq. 21's
    1 - lambda_t), theta eq. 27's eta_t, ``u`` the loss gradient at ``Wc``. The chunk approximation
    (eqs. 30-32): with ``lag`` (a chunk's first token) the token takes that step exactly and its
    weights become the chunk's gradient point ``Wc``; the chunk's other tokens take their gradients
    at ``Wc`` and move the weights reads use linearly, ``W = a W - theta u``. The log-weights ``Z``
    take ``Z = a Z - theta u`` at every token, and with ``end`` (a chunk's last token) the weights
    are ``c softmax(Z)`` again.

    Choices (``ops/memory/README.md``, "Memora: KL retention", compares the sources): a slice is a
    row, the weights into one unit (two implementations normalise rows; one transcription says
    only "per slice"; eqs. 18-21 constrain a whole matrix); ``c`` is one fixed number; the
    log-weights, not the linear W, cross chunk boundaries (one transcription carries W and takes
    its log at the next lag token, undefined where a linear step left an entry <= 0, and its forget
    gate would reach log W once per chunk; another accumulates log W); any objective, ``u``
    clipped before the step with ``max_grad_norm``; no momentum.

    q, k, v ``[N, 1, D]``; theta, alpha ``[N, 1, 1]`` (alpha None: no forgetting); ``delta``
    ``[N, 1]`` (objectives with a threshold). ``lag`` and ``end`` are bools, or 0-dim bool tensors
    in the decode graph (no Python branch on the state there). Returns ``(y [N, 1, D], W, Wc, Z)``."""
    L = len(W)
    hs, _, dzs = key_gradients(Wc, k, v, activation, residual, objective, delta)
    th = theta
    if max_grad_norm is not None:
        th = th * clip_scale(dzs, hs, max_grad_norm)[0].unsqueeze(-1)  # (N, 1, 1)
    u = [dz.transpose(-1, -2) @ h for dz, h in zip(dzs, hs)]
    keep = 1.0 if alpha is None else 1 - alpha
    Z = tuple(keep * z - th * g for z, g in zip(Z, u))  # eq. 27's alpha log W - eta grad, every token

    def on_simplex(Z):  # (W, Wc, Z) with W = c softmax(Z) row by row, also the chunk's gradient point
        logs, ws = kl_simplex(Z, scale)
        return ws + ws + logs

    # the lag token takes the exact step; the chunk's others move the read weights linearly (eqs. 31-32)
    out = _when(lag, lambda: on_simplex(Z), lambda: tuple(keep * w - th * g for w, g in zip(W, u)) + tuple(Wc) + Z)
    W, Wc, Z = out[:L], out[L : 2 * L], out[2 * L :]
    y = mlp_forward(W, q, activation, residual)
    out = _when(end, lambda: on_simplex(Z), lambda: W + Wc + Z)  # a chunk's end: back on the simplex
    return y, out[:L], out[L : 2 * L], out[2 * L :]


@full_precision
def step_memory(
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
    """One token: q, k, v ``[B, 1, H, D]``, gates (and ``delta``) ``[B, 1, H]``, ``gamma``
    ``[B, 1, H, c]``. Returns ``(y [B, 1, H, D], state)``."""
    objective = as_objective(objective)
    check_inputs(
        q, k, v, theta, eta, alpha, weights, state, chunk_size, activation, single_token=True, max_grad_norm=max_grad_norm,
        objective=objective, delta=delta, retention_q=retention_q, gamma=gamma, residual=residual,
        retention_kl=retention_kl, muon_steps=muon_steps,
    )  # fmt: skip
    dtype, cd = q.dtype, compute_dtype(q.dtype)
    B, _, H, D = q.shape
    N = B * H
    if state is None:
        state = initial_memory_state(weights, B, momentum=eta is not None, dtype=cd, retention_kl=retention_kl,
                                     muon_steps=muon_steps)

    def flat_w(w: Tensor) -> Tensor:  # (B, H, o, i) -> (B*H, o, i)
        return w.to(cd).reshape(N, *w.shape[2:])

    def gate(g: Tensor) -> Tensor:  # (B, 1, H) -> (B*H, 1, 1)
        return g.to(cd).reshape(N, 1, 1)

    def tok(x: Tensor) -> Tensor:  # (B, 1, H, D) -> (B*H, 1, D)
        return x.to(cd).reshape(N, 1, x.shape[-1])

    W = tuple(flat_w(w) for w in state.weights)
    Wc = W if state.position == 0 else tuple(flat_w(w) for w in state.chunk_weights)
    S_prev = None
    if eta is not None:
        S_prev = tuple(flat_w(s) for s in state.momentum) if state.momentum is not None else None
    kk, vv, dd = tok(k), tok(v), None if delta is None else delta.to(cd).reshape(N, 1)
    pos = (state.position + 1) % chunk_size
    if retention_kl is not None:
        y, W, Wc, Z = kl_step_flat(
            W, Wc, tuple(flat_w(z) for z in state.log_weights), tok(q), kk, vv, gate(theta),
            None if alpha is None else gate(alpha), activation, residual, max_grad_norm, objective, dd,
            retention_kl, lag=state.position == 0, end=pos == 0,
        )  # fmt: skip
        final = state_from_flat(B, H, W, None, Wc, pos, log_weights=Z)
        return y.reshape(B, H, 1, v.shape[-1]).transpose(1, 2).to(dtype), final
    mix, window = None, None
    if gamma is not None:  # the Omega rule: the window's c - 1 tokens, then this one
        c = gamma.shape[-1]
        kk, vv, dd, valid = window_tokens(state.window, c, kk, vv, dd)
        mix = window_weights(gamma.to(cd).reshape(N, 1, c), valid, 0, 1).squeeze(1)  # (N, c)
        window = next_window(kk, vv, dd, valid, c)
    y, W, S = step_flat(
        W, Wc, S_prev, tok(q), kk, vv, gate(theta),
        None if eta is None else gate(eta), None if alpha is None else gate(alpha),
        activation, residual, max_grad_norm, objective, dd, retention_q, mix, muon_steps,
    )  # fmt: skip
    final = state_from_flat(B, H, W, S, Wc, pos, window, muon_steps=muon_steps)
    return y.reshape(B, H, 1, v.shape[-1]).transpose(1, 2).to(dtype), final
