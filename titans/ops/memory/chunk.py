"""The chunk-parallel form of the neural memory (SPEC section 1, "Parallel form").

Inside a chunk every quantity is linear in the per-token gradients ``u_i`` (all taken at the
chunk-start weights), so a chunk of n tokens is a handful of batched matrix products; the only
loop runs over chunks. See README.md in this folder for the derivation, in these names.

Memory: the sequence is processed in groups of chunks under activation checkpointing when
gradients are needed, so training keeps one state per group alive instead of every chunk's
weights, and the backward pass recomputes one group at a time. Cost stays linear in T.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .mlp import activation as act_fn
from .mlp import key_gradients
from .state import MemoryState, check_inputs, compute_dtype, initial_memory_state, log_gate

__all__ = ["chunk_memory"]


def _segsum(x: Tensor) -> Tensor:
    """``out[..., t, s] = sum_{j=s+1..t} x[..., j]`` for t >= s (0 on the diagonal), -inf above.

    Each entry is its own masked cumulative sum, never a difference of two long cumulative sums,
    so no precision is lost when the logs are large and negative."""
    n = x.shape[-1]
    xe = x.unsqueeze(-1).expand(*x.shape, n)  # (..., t, s) = x_t
    strict = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)  # t > s
    out = xe.masked_fill(~strict, 0.0).cumsum(dim=-2)
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # t >= s
    return out.masked_fill(~lower, float("-inf"))


def _chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_a: Tensor | None,
    log_eta: Tensor | None,
    W0: Sequence[Tensor],
    S0: Sequence[Tensor] | None,
    Wg: Sequence[Tensor],
    act: str,
    residual: bool,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...] | None]:
    """One chunk of n tokens for N independent memories.

    q, k, v: ``[N, n, D]``; theta, log_a (= log(1 - alpha)), log_eta: ``[N, n]``.
    W0, S0: weights and momentum before the chunk's first token; Wg: the weights every token of
    this chunk takes its gradient at (W0 itself unless the chunk was entered mid-way).
    Returns ``(y [N, n, D], W_end, S_end)``.
    """
    n = q.shape[1]
    # Decay products inside the chunk, from sums of logs (positions 1..n).
    if log_a is not None:
        A = log_a.cumsum(-1).exp()  # A_t = prod_{j<=t} a_j              (N, n)
        Fm = _segsum(log_a).exp()  # F[t,s] = prod_{s<j<=t} a_j           (N, n, n)
    else:
        A = None
        Fm = torch.ones(n, n, dtype=q.dtype, device=q.device).tril()
    if log_eta is not None:
        e = log_eta.cumsum(-1).exp()  # e_s = prod_{j<=s} eta_j           (N, n)
        E = _segsum(log_eta).exp()  # E[s,i] = prod_{i<j<=s} eta_j        (N, n, n)
        B = (Fm @ e.unsqueeze(-1)).squeeze(-1)  # B_t = sum_s F[t,s] e_s   (N, n)
        C = (Fm @ E) * theta.unsqueeze(-2)  # C[t,i] = sum_s F[t,s] E[s,i] theta_i
    else:
        B = None
        C = Fm * theta.unsqueeze(-2)

    # Per-token gradients at Wg in factored form: u_i(l) = dz_i(l) h_i(l-1)^T.
    hs, dzs = key_gradients(Wg, k, v, act, residual)

    # Retrieval with per-token weights M_t = A_t W0 + B_t S0 - sum_{i<=t} C[t,i] u_i.
    L = len(W0)
    r = q
    for l in range(L):
        z = r @ W0[l].transpose(-1, -2)
        if A is not None:
            z = A.unsqueeze(-1) * z
        if B is not None:
            z = z + B.unsqueeze(-1) * (r @ S0[l].transpose(-1, -2))
        z = z - ((r @ hs[l].transpose(-1, -2)) * C) @ dzs[l]
        r = act_fn(act, z) if l < L - 1 else z
    y = r + q if residual else r

    # State after the chunk's last token: the last row of the same formulas.
    c_last = C[:, -1, :].unsqueeze(-1)  # (N, n, 1)
    a_end = None if A is None else A[:, -1, None, None]
    W_end = []
    for l in range(L):
        w = W0[l] if a_end is None else a_end * W0[l]
        if B is not None:
            w = w + B[:, -1, None, None] * S0[l]
        W_end.append(w - dzs[l].transpose(-1, -2) @ (c_last * hs[l]))
    S_end = None
    if log_eta is not None:
        m_last = (E[:, -1, :] * theta).unsqueeze(-1)  # E[n,i] theta_i
        S_end = tuple(
            e[:, -1, None, None] * S0[l] - dzs[l].transpose(-1, -2) @ (m_last * hs[l]) for l in range(L)
        )
    return y, tuple(W_end), S_end


def _run_group(spans, act, residual, L, has_eta, q, k, v, theta, log_a, log_eta, *state):
    """Run consecutive chunk spans ``[(start, length, fresh), ...]`` (offsets relative to the
    given slices); ``fresh`` = the span starts a new chunk (gradients at its own start weights).
    ``state`` = W (L tensors), S (L tensors if has_eta), Wg (L tensors)."""
    W = state[:L]
    S = state[L : 2 * L] if has_eta else None
    Wg = state[-L:]
    ys = []
    for start, n, fresh in spans:
        if fresh:
            Wg = W
        sl = slice(start, start + n)
        y, W, S = _chunk(
            q[:, sl], k[:, sl], v[:, sl], theta[:, sl],
            None if log_a is None else log_a[:, sl],
            None if log_eta is None else log_eta[:, sl],
            W, S, Wg, act, residual,
        )  # fmt: skip
        ys.append(y)
    out = (torch.cat(ys, dim=1),) + tuple(W) + (tuple(S) if has_eta else ()) + tuple(Wg)
    return out


def chunk_memory(
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
    checkpoint_chunks: int = 8,
) -> tuple[Tensor, MemoryState]:
    """Chunk-parallel neural memory; same signature and results as ``naive_memory``.

    ``checkpoint_chunks``: when gradients are needed, chunks are run in groups of this many
    under activation checkpointing (0 disables it: faster, but keeps every chunk's activations).
    """
    check_inputs(q, k, v, theta, eta, alpha, weights, state, chunk_size, activation)
    if isinstance(checkpoint_chunks, bool) or not isinstance(checkpoint_chunks, int) or checkpoint_chunks < 0:
        raise ValueError(f"checkpoint_chunks must be an int >= 0, got {checkpoint_chunks!r}")
    dtype = q.dtype
    cd = compute_dtype(dtype)
    B, T, H, D = q.shape
    N = B * H
    if state is None:
        state = initial_memory_state(weights, B, momentum=eta is not None, dtype=cd)
    L = state.depth
    has_eta = eta is not None

    def flat(x: Tensor) -> Tensor:  # (B, T, H, ...) -> (B*H, T, ...)
        return x.to(cd).transpose(1, 2).reshape(N, T, *x.shape[3:])

    def flat_w(w: Tensor) -> Tensor:  # (B, H, o, i) -> (B*H, o, i)
        return w.to(cd).reshape(N, *w.shape[2:])

    qf, kf, vf, thf = flat(q), flat(k), flat(v), flat(theta)
    log_a = None if alpha is None else log_gate(1 - flat(alpha))
    log_eta = None if eta is None else log_gate(flat(eta))
    W = tuple(flat_w(w) for w in state.weights)
    Wg = tuple(flat_w(w) for w in state.chunk_weights)
    S = None
    if has_eta:
        S = tuple(flat_w(s) for s in state.momentum) if state.momentum is not None else tuple(
            torch.zeros_like(w) for w in W
        )

    # Cut [0, T) into chunk spans; the first one completes the pending chunk of the state.
    spans, t, pos = [], 0, state.position
    while t < T:
        n = min(chunk_size - pos, T - t)
        spans.append((t, n, pos == 0))
        t += n
        pos = (pos + n) % chunk_size

    use_ckpt = checkpoint_chunks > 0 and torch.is_grad_enabled() and len(spans) > checkpoint_chunks
    group = checkpoint_chunks if use_ckpt else len(spans)
    ys = []
    for g in range(0, len(spans), group):
        gs = spans[g : g + group]
        start, stop = gs[0][0], gs[-1][0] + gs[-1][1]
        rel = [(s - start, n, fresh) for s, n, fresh in gs]
        sl = slice(start, stop)
        args = (
            qf[:, sl], kf[:, sl], vf[:, sl], thf[:, sl],
            None if log_a is None else log_a[:, sl],
            None if log_eta is None else log_eta[:, sl],
        )  # fmt: skip
        st = W + (S if has_eta else ()) + Wg
        if use_ckpt:
            out = checkpoint(
                _run_group, rel, activation, residual, L, has_eta, *args, *st, use_reentrant=False
            )
        else:
            out = _run_group(rel, activation, residual, L, has_eta, *args, *st)
        ys.append(out[0])
        W = out[1 : 1 + L]
        S = out[1 + L : 1 + 2 * L] if has_eta else None
        Wg = out[-L:]

    y = torch.cat(ys, dim=1).reshape(B, H, T, D).transpose(1, 2).to(dtype)

    def unflat(w: Tensor) -> Tensor:
        return w.reshape(B, H, *w.shape[1:])

    Wu = tuple(unflat(w) for w in W)
    final = MemoryState(
        weights=Wu,
        momentum=None if S is None else tuple(unflat(s) for s in S),
        chunk_weights=Wu if pos == 0 else tuple(unflat(w) for w in Wg),
        position=pos,
    )
    return y, final
