"""Attention layers: full causal, sliding-window with a persistent-memory prefix, and MAC segment
attention over ``[persistent || memory tokens || segment]``; RoPE; a KV cache for decoding.

The math lives in ``titans.ops.attention``; this module owns the projections, the persistent
tokens' keys/values and the cache. The cache keeps only what later tokens can still see: all
keys for full attention (it grows, by design), the last ``window - 1`` for sliding windows, the
current segment for MAC; so the state of the last two is O(1) in the tokens seen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import _sdpa, apply_rotary, causal_attention, segment_attention, sliding_window_attention
from ..ops.tensors import standard_strides

__all__ = ["Attention", "KVCache", "PersistentMemory"]

KINDS = ("full", "swa", "segment")


class PersistentMemory(nn.Module):
    """``N_p`` learnable, input-independent tokens (paper eq. 19), fixed at test time."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)

    def forward(self) -> Tensor:
        return self.tokens


@dataclass
class KVCache:
    """Keys (RoPE applied) and values of earlier tokens that later tokens may still attend to.

    k, v: ``[B, L, H, D]``; mem_k, mem_v: the memory tokens' keys/values of the current segment
    (MAC only); position: absolute index of the next token."""

    k: Tensor
    v: Tensor
    position: int
    mem_k: Tensor | None = None
    mem_v: Tensor | None = None

    def detach(self) -> "KVCache":
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return replace(self, k=d(self.k), v=d(self.v), mem_k=d(self.mem_k), mem_v=d(self.mem_v))

    def num_bytes(self) -> int:
        ts = [t for t in (self.k, self.v, self.mem_k, self.mem_v) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


class Attention(nn.Module):
    """Multi-head attention of one of three kinds.

    Args:
        dim: model width. heads / head_dim: attention heads (head_dim defaults to dim // heads).
        kind: 'full' (causal), 'swa' (sliding window of ``window`` tokens, itself included) or
            'segment' (MAC: causal attention inside segments of ``segment`` tokens, also over the
            memory tokens given to ``forward``).
        persistent_tokens: number of learnable persistent tokens every position attends to.
        rope_base: RoPE base (rotary embedding on queries and keys of the tokens, at their
            absolute positions; the persistent tokens carry no position).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        kind: str = "full",
        window: int | None = None,
        segment: int | None = None,
        persistent_tokens: int = 0,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"heads ({heads}) must divide dim ({dim}) unless head_dim is given")
            head_dim = dim // heads
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        if kind == "swa" and (window is None or window < 1):
            raise ValueError(f"sliding-window attention needs window >= 1, got {window}")
        if kind == "segment" and (segment is None or segment < 1):
            raise ValueError(f"segment attention needs segment >= 1, got {segment}")
        if persistent_tokens < 0:
            raise ValueError(f"persistent_tokens must be >= 0, got {persistent_tokens}")
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.kind, self.window, self.segment, self.rope_base = kind, window, segment, rope_base
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.persistent = PersistentMemory(persistent_tokens, dim) if persistent_tokens else None
        self._masks: dict = {}  # segment masks by (T, prefix, device): built once, reused

    def split_heads(self, x: Tensor) -> Tensor:
        """``[..., heads * head_dim]`` -> ``[..., heads, head_dim]``."""
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)  # (B, T, H, D)

    def keys(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (rotated to ``positions`` ``[T]``) and values of x ``[B, T, dim]``: ``[B, T, H, D]`` each."""
        k = apply_rotary(self.split_heads(self.to_k(x)), positions, self.rope_base)
        return k, self.split_heads(self.to_v(x))

    def prefix_keys(self, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        """The persistent tokens' keys and values ``[1, N_p, H, D]`` (no rotation), or (None, None)."""
        if self.persistent is None:
            return None, None
        p = self.persistent().to(dtype).unsqueeze(0)  # (1, Np, dim): no position, no rotation
        return self.split_heads(self.to_k(p)), self.split_heads(self.to_v(p))

    def empty_cache(self, batch_size: int, device=None, dtype=None) -> KVCache:
        shape = (batch_size, 0, self.heads, self.head_dim)
        z = torch.zeros(shape, device=device, dtype=dtype)
        mem = z if self.kind == "segment" else None
        return KVCache(k=z, v=z, position=0, mem_k=mem, mem_v=mem)

    def forward(
        self, x: Tensor, cache: KVCache | None = None, memory_tokens: Tensor | None = None
    ) -> tuple[Tensor, KVCache]:
        """x ``[B, T, dim]`` (and, for 'segment', memory_tokens ``[B, T, dim]``: token i's memory
        read h_i) -> ``(y [B, T, dim], cache)``. With ``cache`` the call continues a sequence."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [batch, time, dim={self.dim}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        if T == 0:
            raise ValueError("x has an empty time dimension (T = 0)")
        if (self.kind == "segment") != (memory_tokens is not None):
            raise ValueError("memory_tokens are required for kind='segment' and only for it")
        if memory_tokens is not None and memory_tokens.shape != x.shape:
            raise ValueError(f"memory_tokens must have the shape of x {tuple(x.shape)}, got {tuple(memory_tokens.shape)}")
        if cache is None:
            cache = self.empty_cache(B, x.device, x.dtype)
        elif cache.k.shape[0] != B:
            raise ValueError(f"cache was made for batch size {cache.k.shape[0]}, x has {B}")
        q, k, v = self.project(x, cache.position)
        return self.attend(q, k, v, cache, memory_tokens, self.prefix_keys(x.dtype))

    def project(self, x: Tensor, position: int) -> tuple[Tensor, Tensor, Tensor]:
        """Queries and keys (RoPE at positions ``position, position + 1, ...``) and values of x
        ``[B, T, dim]``, each ``[B, T, H, D]``. MAC projects its whole input once with this and
        then attends segment by segment (``attend``), instead of projecting every segment."""
        positions = torch.arange(position, position + x.shape[1], device=x.device)
        q = apply_rotary(self.split_heads(self.to_q(x)), positions, self.rope_base)
        k, v = self.keys(x, positions)
        return q, k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cache: KVCache,
        memory_tokens: Tensor | None,
        prefix: tuple[Tensor | None, Tensor | None],
    ) -> tuple[Tensor, KVCache]:
        """``forward`` after the projections: q, k, v ``[B, T, H, D]`` from ``project`` at
        ``cache.position``; ``prefix`` the persistent tokens' keys and values (``prefix``).
        Unchecked: ``forward`` validates, MAC builds these from one validated input."""
        B, T = q.shape[:2]
        pos = cache.position
        pk, pv = prefix
        if self.kind == "segment" and pos % self.segment == 0 and T <= self.segment:
            return self._fresh_segment(q, k, v, memory_tokens, pos, prefix)
        k_all, v_all = torch.cat([cache.k, k], 1), torch.cat([cache.v, v], 1)
        mem_k = mem_v = None
        if self.kind == "full":
            kk, vv = k_all, v_all
            if pk is not None:  # the persistent tokens sit before the first token: all see them
                kk = torch.cat([pk.expand(B, -1, -1, -1), k_all], 1)
                vv = torch.cat([pv.expand(B, -1, -1, -1), v_all], 1)
            out = causal_attention(q, kk, vv)
            keep = k_all.shape[1]
        elif self.kind == "swa":
            out = sliding_window_attention(q, k_all, v_all, window=self.window, prefix_k=pk, prefix_v=pv)
            keep = self.window - 1
        else:
            positions = torch.arange(pos, pos + T, device=q.device)
            hk, hv = self.keys(memory_tokens, positions)
            mk_all, mv_all = torch.cat([cache.mem_k, hk], 1), torch.cat([cache.mem_v, hv], 1)
            offset = pos % self.segment
            out = segment_attention(
                q, k_all, v_all, mk_all, mv_all, segment=self.segment, offset=offset, prefix_k=pk, prefix_v=pv
            )
            keep = (pos + T) % self.segment  # tokens of the segment still open after this call
            mem_k, mem_v = mk_all[:, mk_all.shape[1] - keep :], mv_all[:, mv_all.shape[1] - keep :]
        k_keep = k_all[:, k_all.shape[1] - min(keep, k_all.shape[1]) :]
        v_keep = v_all[:, v_all.shape[1] - min(keep, v_all.shape[1]) :]
        y = self.to_out(out.reshape(B, T, self.heads * self.head_dim))
        return y, KVCache(k=k_keep, v=v_keep, position=pos + T, mem_k=mem_k, mem_v=mem_v)

    def _fresh_segment(self, q, k, v, memory_tokens, pos: int, prefix) -> tuple[Tensor, KVCache]:
        """Segment attention for T <= segment tokens that start a segment (MAC's training calls):
        nothing cached to join, one block ``[P || h || x]`` with a mask built once per shape,
        instead of ``segment_attention``'s padding and cache concatenations (the general path,
        which gives the same outputs; the tests compare them)."""
        B, T = q.shape[:2]
        hk, hv = self.keys(memory_tokens, torch.arange(pos, pos + T, device=q.device))
        mask = self.segment_mask(T, 0 if prefix[0] is None else prefix[0].shape[1], q.device)
        y = self.segment_block(q, k, v, hk, hv, prefix, mask)
        # the open segment's keys: copies, so that a state kept between calls does not pin a
        # projection of the whole input (MAC passes slices of one)
        keep = (pos + T) % self.segment
        kept = [t[:, T - keep :].clone() for t in (k, v, hk, hv)]
        return y, KVCache(k=kept[0], v=kept[1], position=pos + T, mem_k=kept[2], mem_v=kept[3])

    def segment_block(self, q, k, v, hk, hv, prefix, mask) -> Tensor:
        """Attention of a fresh segment's queries over ``[P || h || x]`` (keys hk, k; values hv, v)
        with ``mask`` (``segment_mask``), projected out: ``[B, T, dim]``."""
        B, T = q.shape[:2]
        pk, pv = prefix
        ks, vs = [hk, k], [hv, v]
        if pk is not None:
            ks.insert(0, pk.expand(B, -1, -1, -1))
            vs.insert(0, pv.expand(B, -1, -1, -1))
        out = _sdpa(q, torch.cat(ks, 1), torch.cat(vs, 1), mask)
        return self.to_out(out.reshape(B, T, self.heads * self.head_dim))

    # ---- one token, for the decode graphs ---------------------------------------------------

    def attend_one(self, q: Tensor, keys: list[Tensor], values: list[Tensor], visible: list[Tensor]) -> Tensor:
        """Attention of one query ``[B, 1, H, D]`` over the persistent prefix and the given keys
        and values (lists of ``[B, n_i, H, D]``, each with its ``visible`` ``[n_i]`` bool mask),
        projected out: ``[B, 1, dim]``. Fixed shapes, no Python branch on values."""
        B = q.shape[0]
        pk, pv = self.prefix_keys(q.dtype)
        if pk is not None:
            keys, values = [pk.expand(B, -1, -1, -1), *keys], [pv.expand(B, -1, -1, -1), *values]
            visible = [torch.ones(pk.shape[1], dtype=torch.bool, device=q.device), *visible]
        out = _sdpa(q, torch.cat(keys, 1), torch.cat(values, 1), torch.cat(visible)[None])  # (B, 1, H, D)
        return self.to_out(out.reshape(B, 1, -1))

    def window_buffers(self, cache: KVCache) -> tuple[Tensor, Tensor]:
        """A sliding window's cached keys and values in ``window - 1`` slots, right-aligned (a
        stream's first tokens leave zeros in front), as ``step_window`` takes them."""
        n = self.window - 1
        pad = lambda t: standard_strides(t) if t.shape[1] == n else F.pad(t, (0, 0, 0, 0, n - t.shape[1], 0))  # noqa: E731
        return pad(cache.k), pad(cache.v)

    def step_window(self, u: Tensor, position: Tensor, k_buf: Tensor, v_buf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sliding-window attention ('swa') of one token u ``[B, 1, dim]`` at ``position`` (0-dim
        integer tensor) after ``window_buffers``: slot i holds the key of token position - n + i
        (n = window - 1; a real token when that is >= 0). Returns ``(y [B, 1, dim], k_buf,
        v_buf)``, the buffers moved on by this token."""
        positions = position.reshape(1)
        q = apply_rotary(self.split_heads(self.to_q(u)), positions, self.rope_base)
        k, v = self.keys(u, positions)
        n = self.window - 1
        real = torch.arange(n, device=u.device) >= n - position
        itself = torch.ones(1, dtype=torch.bool, device=u.device)
        y = self.attend_one(q, [k_buf, k], [v_buf, v], [real, itself])
        # contiguous: the next token's inputs keep one stride pattern (window 1: n = 0 slots)
        return y, torch.cat([k_buf, k], 1)[:, 1:].contiguous(), torch.cat([v_buf, v], 1)[:, 1:].contiguous()

    def window_cache(self, k_buf: Tensor, v_buf: Tensor, position: int) -> KVCache:
        """The KVCache after ``step_window`` at a stream's ``position`` (tokens seen): the real
        tokens of the buffers, as the general path keeps them."""
        keep = min(position, self.window - 1)
        n = k_buf.shape[1]
        return KVCache(k=k_buf[:, n - keep :], v=v_buf[:, n - keep :], position=position)

    def segment_mask(self, T: int, n_prefix: int, device) -> Tensor:
        """``[T, n_prefix + 2T]``: every query sees the prefix, and h_i and x_i for i <= j."""
        key = (T, n_prefix, str(device))
        mask = self._masks.get(key)
        if mask is None:
            tri = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = torch.cat([torch.ones(T, n_prefix, dtype=torch.bool, device=device), tri, tri], dim=-1)
            self._masks[key] = mask
        return mask
