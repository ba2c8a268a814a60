"""Attention as plain functions, all ``[batch, time, heads, dim]``.

- ``attention_reference``: explicit masked softmax (the reference for tests; small inputs only).
- ``causal_attention``: full causal attention, queries being the last T of the keys.
- ``sliding_window_attention``: each query sees the ``window`` latest keys (itself included) and
  every key of an optional prefix (the persistent memory), computed block by block so that
  memory is O(T * (window + prefix)), never a T x T mask.
- ``segment_attention``: MAC's attention inside segments of length C over
  ``[prefix || memory tokens || segment]``, causal in both the memory tokens and the segment.

Every fast path runs ``torch.nn.functional.scaled_dot_product_attention`` on blocks with a
block-local boolean mask. Each function also takes the keys/values of earlier tokens (a cache),
so that a sequence fed in pieces gives the outputs of one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "apply_rotary",
    "attention_reference",
    "causal_attention",
    "segment_attention",
    "sliding_window_attention",
]


def apply_rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (rotate-half convention) at absolute ``positions`` ``[T]``.

    Angles are computed in float64: at a million tokens a float32 angle would be off by ~0.1 rad."""
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {D}")
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)
    angles = positions.to(device=x.device, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)[None, :, None, :]  # (1, T, 1, D)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D) masked) v. ``mask`` ``[Tq, Tk]`` (or ``[B, Tq, Tk]``), True = attend."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    m = mask if mask.dim() == 2 else mask[:, None]
    scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores.double(), dim=-1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool = False) -> Tensor:
    """SDPA on ``[..., T, H, D]`` tensors (any leading batch dims); mask broadcast to (..., H, Tq, Tk)."""
    out = F.scaled_dot_product_attention(
        q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), attn_mask=mask, is_causal=is_causal
    )
    return out.transpose(-3, -2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, query_block: int = 1024) -> Tensor:
    """Full causal attention; ``q`` holds the last T positions of the Tk keys (Tk - T cached)."""
    T, Tk = q.shape[1], k.shape[1]
    past = Tk - T
    if past < 0:
        raise ValueError(f"more queries ({T}) than keys ({Tk})")
    if past == 0:
        return _sdpa(q, k, v, None, is_causal=True)
    if T == 1:
        return _sdpa(q, k, v, None)
    outs = []  # queries in blocks: a block of b queries needs a (b, Tk) mask, never (T, Tk)
    for s in range(0, T, query_block):
        e = min(T, s + query_block)
        pos = torch.arange(past + s, past + e, device=q.device)
        mask = torch.arange(Tk, device=q.device)[None, :] <= pos[:, None]
        outs.append(_sdpa(q[:, s:e], k[:, : past + e], v[:, : past + e], mask[:, : past + e]))
    return torch.cat(outs, 1)


def _with_prefix(k: Tensor, prefix: Tensor | None) -> Tensor:
    """Prepend prefix keys ``[B or 1, Np, H, D]`` to block keys ``[B, nb, L, H, D]``."""
    if prefix is None:
        return k
    B, nb = k.shape[:2]
    p = prefix.expand(B, *prefix.shape[1:]).unsqueeze(1).expand(B, nb, *prefix.shape[1:])
    return torch.cat([p, k], dim=2)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
) -> Tensor:
    """Sliding-window attention with an optional always-visible prefix.

    ``q`` ``[B, T, H, D]`` holds the last T positions of ``k, v`` ``[B, Tk, H, D]`` (the first
    Tk - T are cached keys; at most ``window - 1`` of them matter). The query at key position p
    attends to keys in ``(p - window, p]`` and to every prefix key ``[B or 1, Np, H, D]``.
    Queries are processed in blocks of ``window``; each block sees ``2 * window - 1`` keys.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, T, H, D = q.shape
    Tk = k.shape[1]
    past = Tk - T
    if past < 0:
        raise ValueError(f"more queries ({T}) than keys ({Tk})")
    w = min(window, T)  # query block
    nb = -(-T // w)
    pad_right = nb * w - T
    lead = window - 1  # keys before a block's first query that it may see
    # Keys in "padded" coordinates: lead zeros, the Tk keys, then pad_right zeros. Drop cached keys
    # that no query can see.
    drop = max(0, past - lead)
    k, v, past = k[:, drop:], v[:, drop:], past - drop
    left = lead - past
    kp = F.pad(k, (0, 0, 0, 0, left, pad_right))
    vp = F.pad(v, (0, 0, 0, 0, left, pad_right))
    L = lead + w  # keys per block
    kb = kp.unfold(1, L, w).permute(0, 1, 4, 2, 3)  # (B, nb, L, H, D)
    vb = vp.unfold(1, L, w).permute(0, 1, 4, 2, 3)
    qb = F.pad(q, (0, 0, 0, 0, 0, pad_right)).reshape(B, nb, w, H, D)
    # Block-local mask: query r sees block key c iff r <= c <= r + window - 1 and c is a real key.
    r = torch.arange(w, device=q.device)[:, None]
    c = torch.arange(L, device=q.device)[None, :]
    band = (c >= r) & (c <= r + lead)  # (w, L)
    key_pos = torch.arange(nb, device=q.device)[:, None] * w + torch.arange(L, device=q.device)[None, :]
    real = (key_pos >= left) & (key_pos < left + past + T)  # (nb, L)
    mask = band[None] & real[:, None, :]  # (nb, w, L)
    if prefix_k is not None:
        Np = prefix_k.shape[1]
        mask = torch.cat([mask.new_ones(nb, w, Np), mask], dim=-1)
        kb, vb = _with_prefix(kb, prefix_k), _with_prefix(vb, prefix_v)
    out = _sdpa(qb, kb, vb, mask[:, None])  # mask (nb, 1, w, L) broadcasts over B and heads
    return out.reshape(B, nb * w, H, D)[:, :T]


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    *,
    segment: int,
    offset: int = 0,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
) -> Tensor:
    """MAC attention: within each segment of ``segment`` tokens, the query at position j sees the
    prefix, the memory tokens h_i and the segment tokens x_i for i <= j (same segment only).

    ``k, v, mem_k, mem_v`` ``[B, Tk, H, D]`` cover ``offset`` earlier tokens of the current segment
    (a cache) and then the T tokens of ``q``; ``offset < segment``.
    """
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    B, T, H, D = q.shape
    if k.shape[1] != offset + T or mem_k.shape[1] != offset + T:
        raise ValueError("keys must cover the cached offset tokens and the queries")
    if not 0 <= offset < segment:
        raise ValueError(f"offset must lie in [0, segment), got {offset}")
    total = offset + T
    ns = -(-total // segment)
    pad = ns * segment - total

    def seg(x: Tensor) -> Tensor:  # (B, offset + T, H, D) -> (B, ns, C, H, D)
        return F.pad(x, (0, 0, 0, 0, 0, pad)).reshape(B, ns, segment, H, D)

    qs = seg(F.pad(q, (0, 0, 0, 0, offset, 0)))
    ks = torch.cat([seg(mem_k), seg(k)], dim=2)  # (B, ns, 2C, H, D)
    vs = torch.cat([seg(mem_v), seg(v)], dim=2)
    tri = torch.ones(segment, segment, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([tri, tri], dim=-1)  # (C, 2C): h_i and x_i for i <= j
    if prefix_k is not None:
        mask = torch.cat([mask.new_ones(segment, prefix_k.shape[1]), mask], dim=-1)
        ks, vs = _with_prefix(ks, prefix_k), _with_prefix(vs, prefix_v)
    out = _sdpa(qs, ks, vs, mask)
    return out.reshape(B, ns * segment, H, D)[:, offset:total]
