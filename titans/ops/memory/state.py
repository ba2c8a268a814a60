"""The recurrent state of the neural memory and the input checks every path shares.

Weights of the memory MLP are stored per batch element and head as ``[B, H, out, in]``
(``z = h @ W.T``), one tensor per layer. Depth L = 1 is the linear (matrix) memory.
"""

from __future__ import annotations

import functools
import math

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from ...errors import NonFiniteError
from ...ops.tensors import nonfinite
from .muon import check_muon_steps

__all__ = ["MemoryState", "MemoryWindow", "memory_shapes", "initial_memory_state", "check_inputs"]


def memory_shapes(head_dim: int, depth: int, expansion: float = 4.0, key_dim: int | None = None) -> list[tuple[int, int]]:
    """(out, in) of each layer of the memory MLP: D_k -> E -> ... -> E -> D, with E = expansion * D
    and D_k = ``key_dim`` (default D; larger for a feature map of the keys)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    key_dim = head_dim if key_dim is None else key_dim
    if depth == 1:
        return [(head_dim, key_dim)]
    hidden = int(round(expansion * head_dim))
    if hidden < 1:
        raise ValueError(f"expansion * head_dim must be >= 1, got {expansion} * {head_dim}")
    dims = [key_dim] + [hidden] * (depth - 1) + [head_dim]
    return [(dims[i + 1], dims[i]) for i in range(depth)]


@dataclass
class MemoryWindow:
    """The Omega rule's last ``c - 1`` tokens (ATLAS eq. 9): a token's update sums the gradients of
    the ``c`` latest tokens, every one taken at the pending chunk's start weights, so the tokens
    before a call must be kept to continue it exactly.

    k, v:   ``[B, H, c - 1, D]``, oldest first; zeros where ``valid`` says no token was seen yet.
    delta:  ``[B, H, c - 1]``, their objective's threshold (huber), or None.
    valid:  how many of the ``c - 1`` slots hold real tokens (the newest ``valid`` slots).
    """

    k: Tensor
    v: Tensor
    delta: Tensor | None
    valid: int

    @property
    def size(self) -> int:
        """c: the window's length, the current token included."""
        return self.k.shape[2] + 1


@dataclass
class MemoryState:
    """Everything needed to continue the memory exactly where a call stopped.

    weights:       M_t, the running weights after the last token seen, each ``[B, H, out, in]``.
    momentum:      S_t, the running surprise, same shapes; ``None`` when momentum is off.
    chunk_weights: M_c, the weights at the start of the pending chunk: every remaining token of
                   that chunk takes its gradient there. Equal to ``weights`` when position == 0.
    position:      tokens of the pending chunk already seen (0 <= position < chunk_size).
    window:        the Omega rule's recent tokens (``MemoryWindow``); None for a window of one.
    log_weights:   Memora's log-weights (``retention_kl``), same shapes: what its KL retention
                   carries from token to token (``weights`` are what a read uses; at position 0
                   ``weights = exp(log_weights)``, every row on the simplex). None for other rules.
    muon_steps:    the ``muon_steps`` of the call that wrote the state (None: the Titans step).
                   ATLAS's Muon momentum sums the raw gradients, the Titans one theta-scaled
                   steps, so a momentum of one kind does not continue under the other
                   (``check_inputs`` refuses it); states saved before the field load as None.
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...] | None
    chunk_weights: tuple[Tensor, ...]
    position: int = 0
    window: MemoryWindow | None = None
    log_weights: tuple[Tensor, ...] | None = None
    muon_steps: int | None = None

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    @property
    def num_heads(self) -> int:
        return self.weights[0].shape[1]

    @property
    def depth(self) -> int:
        return len(self.weights)

    def tensors(self) -> list[Tensor]:
        out = list(self.weights) + list(self.chunk_weights)
        out += list(self.momentum) if self.momentum is not None else []
        if self.window is not None:
            out += [self.window.k, self.window.v] + ([self.window.delta] if self.window.delta is not None else [])
        return out + (list(self.log_weights) if self.log_weights is not None else [])

    def num_bytes(self) -> int:
        """Bytes held by the state (chunk weights shared with the running weights count once)."""
        seen, total = set(), 0
        for t in self.tensors():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def _map(self, fn) -> "MemoryState":
        same = self.chunk_weights is self.weights or all(
            a is b for a, b in zip(self.chunk_weights, self.weights)
        )
        weights = tuple(fn(w) for w in self.weights)
        chunk = weights if same else tuple(fn(w) for w in self.chunk_weights)
        momentum = None if self.momentum is None else tuple(fn(s) for s in self.momentum)
        window = self.window
        if window is not None:
            delta = None if window.delta is None else fn(window.delta)
            window = replace(window, k=fn(window.k), v=fn(window.v), delta=delta)
        logs = None if self.log_weights is None else tuple(fn(z) for z in self.log_weights)
        return replace(self, weights=weights, momentum=momentum, chunk_weights=chunk, window=window, log_weights=logs)

    def detach(self) -> "MemoryState":
        """Cut the autograd history (truncated backprop through time between calls)."""
        return self._map(lambda t: t.detach())

    def to(self, *args, **kwargs) -> "MemoryState":
        return self._map(lambda t: t.to(*args, **kwargs))


def initial_memory_state(
    weights: Sequence[Tensor],
    batch_size: int,
    momentum: bool,
    dtype: torch.dtype | None = None,
    retention_kl: float | None = None,
    muon_steps: int | None = None,
) -> MemoryState:
    """The state before any token: M_0 = ``weights`` (``[H, out, in]`` shared by the batch, or
    ``[B, H, out, in]``), S_0 = 0, position 0. Broadcasting keeps gradients flowing to ``weights``.
    With ``retention_kl = c`` (Memora) ``weights`` are logits, free parameters: the memory starts at
    ``c * softmax`` of each of their rows (``kl_simplex``), and its log-weights are kept too.
    ``muon_steps``: the calls that will continue it (``MemoryState.muon_steps``)."""
    ws = []
    for w in weights:
        if w.dim() == 3:
            w = w.unsqueeze(0).expand(batch_size, *w.shape)
        ws.append(w if dtype is None else w.to(dtype))
    ws, logs = tuple(ws), None
    if retention_kl is not None:
        logs, ws = kl_simplex(ws, retention_kl)
    mom = tuple(torch.zeros_like(w) for w in ws) if momentum else None
    return MemoryState(weights=ws, momentum=mom, chunk_weights=ws, position=0, log_weights=logs, muon_steps=muon_steps)


def lq_scale(weights, q: float) -> Tensor:
    """``||A||_q^(q-2)`` of the accumulator ``A`` (all layers of a memory together, entrywise):
    Moneta's retention reads and writes with ``A / lq_scale(A)`` (MIRAS eq. 24). Weights
    ``[..., out, in]`` -> ``[...]``; 1 for q = 2; floored away from 0 (an all-zero accumulator)."""
    total = sum(w.abs().pow(q).sum((-1, -2)) for w in weights)
    return total.clamp_min(torch.finfo(total.dtype).tiny).pow((q - 2) / q)


def kl_simplex(logits, scale: float) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Memora's map onto its constraint set (MIRAS eqs. 19-21: ``W >= 0`` with every slice summing
    to ``c``; a slice here is a row of a layer's ``[..., out, in]`` matrix, the weights into one
    unit): ``(log W, W)`` with ``W = c * softmax(row)`` of each row of each layer's ``logits``.
    The log-weights come from ``log_softmax`` (no log of a rounded-to-zero weight); a softmax is
    unchanged by adding a constant to a row, so any logits of the same rows give the same W."""
    logs = tuple(torch.log_softmax(z, dim=-1) + math.log(scale) for z in logits)
    return logs, tuple(z.exp() for z in logs)


def check_retention_kl(retention_kl, name: str = "retention_kl") -> None:
    """None (no KL retention) or ``c``, a positive finite number: Memora's KL retention with every
    row of the memory's weights on the simplex of sum c (MIRAS eqs. 19-21, 27)."""
    if retention_kl is None:
        return
    if isinstance(retention_kl, bool) or not isinstance(retention_kl, (int, float)) or not 0 < retention_kl <= 1e6:
        raise ValueError(f"{name} must be None or a number in (0, 1e6] (the scale c of Memora's simplex rows), "
                         f"got {retention_kl!r}")  # fmt: skip


def check_retention_q(retention_q) -> None:
    """None (the Titans / Yaad weight decay only) or a number q >= 2 (Moneta's l_q retention)."""
    if retention_q is None:
        return
    if isinstance(retention_q, bool) or not isinstance(retention_q, (int, float)) or not 2 <= retention_q < math.inf:
        raise ValueError(f"retention_q must be None or a number >= 2 (Moneta's l_q retention), got {retention_q!r}")


def state_from_flat(
    batch: int, heads: int, weights, momentum, chunk_weights, position: int, window: MemoryWindow | None = None,
    log_weights=None, muon_steps: int | None = None,
) -> MemoryState:
    """Build a MemoryState from ``[B*H, out, in]`` tensors (the layout the fast paths compute in);
    ``window`` as ``[B*H, c - 1, ...]`` tensors."""

    def unflat(w: Tensor) -> Tensor:
        return w.reshape(batch, heads, *w.shape[1:])

    ws = tuple(unflat(w) for w in weights)
    return MemoryState(
        weights=ws,
        momentum=None if momentum is None else tuple(unflat(s) for s in momentum),
        chunk_weights=ws if position == 0 else tuple(unflat(w) for w in chunk_weights),
        position=position,
        window=None if window is None else MemoryWindow(
            unflat(window.k), unflat(window.v), None if window.delta is None else unflat(window.delta), window.valid
        ),
        log_weights=None if log_weights is None else tuple(unflat(z) for z in log_weights),
        muon_steps=muon_steps,
    )


def window_tokens(window: MemoryWindow | None, c: int, k: Tensor, v: Tensor, delta: Tensor | None):
    """The ``c - 1`` tokens before a call and the call's own, flat: ``(k, v, delta, valid)`` with
    k, v ``[N, c - 1 + T, D]`` (N = B*H), delta ``[N, c - 1 + T]`` or None, and ``valid`` the number
    of real tokens among the first ``c - 1`` (the rest are zeros: before the stream began).
    ``window`` is the state's (None: a fresh stream), k, v ``[N, T, D]``, delta ``[N, T]``."""
    N, _, D = k.shape
    Dv = v.shape[-1]
    if window is None:
        pk = k.new_zeros(N, c - 1, D)
        pv = v.new_zeros(N, c - 1, Dv)
        pd = None if delta is None else delta.new_zeros(N, c - 1)
        valid = 0
    else:
        pk, pv = window.k.reshape(N, c - 1, D).to(k.dtype), window.v.reshape(N, c - 1, Dv).to(v.dtype)
        pd = None if delta is None else window.delta.reshape(N, c - 1).to(delta.dtype)
        valid = window.valid
    kk, vv = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    dd = None if delta is None else torch.cat([pd, delta], 1)
    return kk, vv, dd, valid


def next_window(kk: Tensor, vv: Tensor, dd: Tensor | None, valid: int, c: int) -> MemoryWindow | None:
    """The window after a call from ``window_tokens``' layout (flat ``[N, c - 1 + T, ...]``)."""
    if c == 1:
        return None
    T = kk.shape[1] - (c - 1)
    # copies: a view would keep the whole call's keys and values alive as long as the state
    return MemoryWindow(kk[:, -(c - 1) :].clone(), vv[:, -(c - 1) :].clone(),
                        None if dd is None else dd[:, -(c - 1) :].clone(), min(c - 1, valid + T))  # fmt: skip


def window_weights(gamma: Tensor, valid: int, start: int, n: int) -> Tensor:
    """The Omega rule's mixing ``Gamma [N, n, c - 1 + n]`` of a span of n tokens that starts at
    call position ``start``: row t (the span's token t) puts ``gamma[:, start + t, j]`` on key
    column ``c - 1 + t - j`` (token t - j, counted in a key list that begins c - 1 tokens before
    the span), and nothing on tokens before the stream began. gamma ``[N, T, c]``."""
    N, _, c = gamma.shape
    g = gamma[:, start : start + n]  # (N, n, c)
    rows = torch.arange(n, device=gamma.device)
    cols = (c - 1 + rows)[:, None] - torch.arange(c, device=gamma.device)[None, :]  # (n, c)
    # key column i stands for call position start - (c - 1) + i; positions before -valid did not exist
    exists = (cols + start - (c - 1) >= -valid).to(gamma.dtype)
    out = gamma.new_zeros(N, n, c - 1 + n)
    index = cols.unsqueeze(0).expand(N, n, c)
    return out.scatter_add(2, index, g * exists)


# ---------------------------------------------------------------------------------------------
# Input checks. Shapes, dtypes and devices are checked always; values (NaN/inf, gate ranges) are
# checked too because a silent NaN in a memory that runs for millions of tokens is worse than the
# cost of one reduction per call.
# ---------------------------------------------------------------------------------------------


def _check_tensor(name: str, x, ndim: int, ref: Tensor | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if ref is not None:
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has dtype {ref.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but q is on {ref.device}")


def _check_finite(named: dict[str, Tensor]) -> None:
    bad = nonfinite(named)
    if bad:
        raise NonFiniteError(f"non-finite values (NaN or inf) in {', '.join(bad)}")


# The clip compares squared norms in float32: a bound whose square overflows float32 cannot be
# applied, and one this large never acts on a finite step anyway (None is the way to say "no clip").
MAX_GRAD_NORM_LIMIT = 1e18


def check_max_grad_norm(max_grad_norm, name: str = "max_grad_norm") -> None:
    """None (no clipping) or a positive number up to ``MAX_GRAD_NORM_LIMIT``."""
    if max_grad_norm is None:
        return
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(max_grad_norm).__name__}")
    if not (math.isfinite(max_grad_norm) and 0 < max_grad_norm <= MAX_GRAD_NORM_LIMIT):
        raise ValueError(f"{name} must be a number in (0, {MAX_GRAD_NORM_LIMIT:g}] or None (no clip), got {max_grad_norm}")


def _momentum_kind(muon_steps: int | None) -> str:
    """What a momentum buffer sums under ``muon_steps``, for a refusal that names both sides."""
    if muon_steps is None:
        return "muon_steps=None (the Titans step: its momentum sums theta-scaled gradients)"
    return f"muon_steps={muon_steps} (ATLAS's Muon: its momentum sums the raw gradients)"


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor | None,
    alpha: Tensor | None,
    weights: Sequence[Tensor] | None,
    state: MemoryState | None,
    chunk_size: int,
    activation: str,
    single_token: bool = False,
    max_grad_norm: float | None = None,
    objective=None,
    delta: Tensor | None = None,
    retention_q: float | None = None,
    gamma: Tensor | None = None,
    residual: bool = False,
    retention_kl: float | None = None,
    muon_steps: int | None = None,
) -> None:
    """Raise a ValueError/TypeError that names the bad argument. ``objective`` (an
    ``objectives.Objective``; None is the paper's l2) decides whether ``delta`` is required;
    ``gamma`` ``[B, T, H, c]`` are the Omega rule's window weights (None: a window of one token);
    ``muon_steps``: ATLAS's Muon with that many Newton-Schulz steps (None: the Titans step)."""
    check_max_grad_norm(max_grad_norm)
    check_retention_q(retention_q)
    check_retention_kl(retention_kl)
    check_muon_steps(muon_steps)
    if muon_steps is not None and retention_q is not None:
        raise ValueError("muon_steps (ATLAS's Muon) and retention_q (Moneta's retention) do not combine yet")
    if muon_steps is not None and retention_kl is not None:
        raise ValueError("muon_steps (ATLAS's Muon) and retention_kl (Memora's retention) do not combine: Memora's "
                         "step is a softmax of the gradient step, not a momentum step")  # fmt: skip
    if retention_kl is not None:
        if retention_q is not None:
            raise ValueError("retention_kl (Memora's KL retention) and retention_q (Moneta's l_q retention) are two "
                             "retentions: pass one")  # fmt: skip
        if eta is not None:
            raise ValueError("retention_kl (Memora's KL retention) is gradient descent without momentum: pass eta=None")
        if gamma is not None:
            raise ValueError("gamma (the Omega rule's window) and retention_kl (Memora's retention) do not combine yet")
    needs_delta = objective is not None and objective.needs_delta
    if needs_delta and delta is None:
        raise ValueError(f"the {objective.name} objective needs delta, its per-token threshold [B, T, H]")
    if delta is not None and not needs_delta:
        raise ValueError(f"delta is the threshold of the huber objective; the {getattr(objective, 'name', 'l2')} "
                         f"objective takes none")  # fmt: skip
    _check_tensor("q", q, 4, None)
    _check_tensor("k", k, 4, q)
    _check_tensor("v", v, 4, q)
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q and k must share the shape [B, T, H, D] and v be [B, T, H, D_v]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, T, H, D = q.shape
    Dv = v.shape[3]
    if residual and Dv != D:
        raise ValueError(f"residual=True adds the key to the memory's output: it needs D_v = D, got {Dv} and {D}")
    if T == 0:
        raise ValueError("q has an empty time dimension (T = 0): nothing to memorise")
    if B == 0 or H == 0 or D == 0:
        raise ValueError(f"q has an empty dimension: shape {tuple(q.shape)} (expected [B, T, H, D])")
    if single_token and T != 1:
        raise ValueError(f"step takes exactly one token: q must have T = 1, got T = {T}")
    gates = {"theta": theta, "eta": eta, "alpha": alpha, "delta": delta}
    for name, g in gates.items():
        if g is None:
            if name == "theta":
                raise ValueError("theta (the learning rate) is required")
            continue
        _check_tensor(name, g, 3, q)
        if tuple(g.shape) != (B, T, H):
            raise ValueError(f"{name} must have shape [B, T, H] = {(B, T, H)}, got {tuple(g.shape)}")
    c = 1
    if gamma is not None:
        _check_tensor("gamma", gamma, 4, q)
        if tuple(gamma.shape[:3]) != (B, T, H) or gamma.shape[3] < 1:
            raise ValueError(f"gamma must have shape [B, T, H, c] = [{B}, {T}, {H}, c >= 1], got {tuple(gamma.shape)}")
        c = gamma.shape[3]
        if retention_q is not None:
            raise ValueError("gamma (the Omega rule's window) and retention_q (Moneta's retention) do not combine yet")
    window = None if state is None or not isinstance(state, MemoryState) else state.window
    if window is not None:
        if gamma is None:
            raise ValueError(f"state holds the Omega rule's window of {window.size} tokens: pass gamma [B, T, H, {window.size}]")
        if window.size != c:
            raise ValueError(f"state's Omega window holds {window.size} tokens, gamma asks for {c}")
        if tuple(window.k.shape) != (B, H, c - 1, D) or tuple(window.v.shape) != (B, H, c - 1, Dv):
            raise ValueError(f"state.window.k and .v must have shapes [B, H, c - 1, D] = {(B, H, c - 1, D)} and "
                             f"{(B, H, c - 1, Dv)}, got {tuple(window.k.shape)} and {tuple(window.v.shape)}")  # fmt: skip
        if (window.delta is None) != (delta is None):
            raise ValueError("state.window.delta must be given exactly when the objective takes delta")
        if not (isinstance(window.valid, int) and 0 <= window.valid <= c - 1):
            raise ValueError(f"state.window.valid must be an int in [0, {c - 1}], got {window.valid!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if activation not in ("silu", "gelu", "relu"):
        raise ValueError(f"activation must be 'silu', 'gelu' or 'relu', got {activation!r}")

    if (weights is None) == (state is None):
        raise ValueError("pass exactly one of weights (the initial memory M_0) or state (to continue)")
    if state is not None:
        if not isinstance(state, MemoryState):
            raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
        layers = state.weights
        if not 0 <= state.position < chunk_size:
            raise ValueError(
                f"state.position = {state.position} is outside [0, chunk_size = {chunk_size}): "
                "the state was made with another chunk_size"
            )
        if (state.log_weights is None) != (retention_kl is None):
            raise ValueError("state holds Memora's log-weights: pass retention_kl" if retention_kl is None else
                             "state has no log-weights: it was not made with retention_kl (Memora's KL retention)")  # fmt: skip
        if state.momentum is not None and (state.muon_steps is None) != (muon_steps is None):
            raise ValueError(f"state.momentum was written with {_momentum_kind(state.muon_steps)}; this call has "
                             f"{_momentum_kind(muon_steps)}: one does not continue the other")  # fmt: skip
        groups = [("state.weights", state.weights), ("state.chunk_weights", state.chunk_weights)]
        if state.momentum is not None:
            groups.append(("state.momentum", state.momentum))
        if state.log_weights is not None:
            groups.append(("state.log_weights", state.log_weights))
        for name, group in groups:
            if len(group) != len(layers):
                raise ValueError(f"{name} has {len(group)} layers, state.weights has {len(layers)}")
            for i, w in enumerate(group):
                if w.dim() != 4 or w.shape[:2] != (B, H):
                    raise ValueError(
                        f"{name}[{i}] must have shape [B={B}, H={H}, out, in], got {tuple(w.shape)}"
                    )
                if w.device != q.device:
                    raise ValueError(f"{name}[{i}] is on {w.device} but q is on {q.device}")
                if w.shape != layers[i].shape:
                    raise ValueError(f"{name}[{i}] shape {tuple(w.shape)} != weights {tuple(layers[i].shape)}")
    else:
        if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)) or not weights:
            raise TypeError("weights must be a non-empty list or tuple of tensors, one per layer")
        layers = weights
        for i, w in enumerate(weights):
            if not isinstance(w, Tensor) or not w.is_floating_point():
                raise TypeError(f"weights[{i}] must be a floating-point tensor")
            if w.dim() == 3:
                ok = w.shape[0] == H
            elif w.dim() == 4:
                ok = w.shape[:2] == (B, H)
            else:
                ok = False
            if not ok:
                raise ValueError(
                    f"weights[{i}] must have shape [H={H}, out, in] or [B={B}, H={H}, out, in], "
                    f"got {tuple(w.shape)}"
                )
            if w.device != q.device:
                raise ValueError(f"weights[{i}] is on {w.device} but q is on {q.device}")
    # The layers must chain D -> ... -> D_v.
    prev = D
    for i, w in enumerate(layers):
        out_dim, in_dim = w.shape[-2], w.shape[-1]
        if in_dim != prev:
            raise ValueError(f"memory layer {i} takes {in_dim} inputs, expected {prev}")
        prev = out_dim
    if prev != Dv:
        raise ValueError(f"the memory's last layer gives {prev} outputs, expected the value dim {Dv}")

    named = {"q": q, "k": k, "v": v, "theta": theta}
    if eta is not None:
        named["eta"] = eta
    if alpha is not None:
        named["alpha"] = alpha
    if delta is not None:
        named["delta"] = delta
    if gamma is not None:
        named["gamma"] = gamma
    _check_finite(named)
    if gamma is not None and bool(((gamma < 0) | (gamma > 1)).any()):
        raise ValueError("gamma (the Omega rule's window weights) must lie in [0, 1]")
    if delta is not None and bool((delta <= 0).any()):
        raise ValueError("delta (the huber threshold) must be > 0")
    if bool((theta < 0).any()):
        raise ValueError("theta (learning rate) must be >= 0")
    for name, g in (("eta", eta), ("alpha", alpha)):
        if g is not None and bool(((g < 0) | (g > 1)).any()):
            raise ValueError(f"{name} must lie in [0, 1]")


def full_precision(fn):
    """Run a memory op with autocast off: its recurrence is computed in float32 (see
    ``compute_dtype``) whatever autocast region it is called from; the output comes back in the
    inputs' dtype. Without this, autocast would run the forward's matmuls in bf16 while a
    hand-written backward sees float32 saved tensors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        q = kwargs.get("q")
        device_type = q.device.type if isinstance(q, Tensor) else "cpu"
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The memory's recurrence runs in float32 at least: half precision drifts over long streams."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def log_gate(g: Tensor) -> Tensor:
    """log(g) for g in [0, 1], finite at g = 0 (clamped to the dtype's tiny), so that products
    taken as exp(sum of logs) are 0 there without NaN in value or gradient."""
    return torch.log(g.clamp_min(torch.finfo(g.dtype).tiny))
