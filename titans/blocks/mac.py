"""MAC: memory as context (paper section 4.1, docs/design.md §4).

For each segment of C tokens: read the memory as it was before the segment, h_t = M*_{s-1}(q_t)
(per token, no write); attend over ``[P || h || segment]`` (causal in h and in the segment);
write the attention outputs y into the memory token by token; output ``y ⊗ M*(y)`` with each
token's own weights (never the segment-end weights, which would show a token its future).
Segments are a loop; inside one, everything is parallel. The state carries the memory, its
weights at the segment start, the query convolution tail and the open segment's KV cache, so
any split of the sequence (one token at a time included) gives one call's outputs.

Decoding one token after a state takes ``step`` instead (``TitansLM._decode_step``): the
same math with the open segment's keys in fixed-size buffers and no Python branch on the state,
so that one compiled graph serves every token of a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.attention import Attention, KVCache
from ..layers.neural_memory import MemoryQueries, MemoryStep, NeuralMemory
from ..ops.attention import apply_rotary
from ..ops.tensors import distinct, standard_strides
from .common import BlockState, NormalizedGate, RMSNorm, SwiGLU


class MACBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.segment = cfg.segment
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.memory = NeuralMemory(cfg.dim, **cfg.memory_kwargs())
        self.attn = Attention(cfg.dim, cfg.heads, kind="segment", segment=cfg.segment,
                              persistent_tokens=cfg.persistent_tokens, rope_base=cfg.rope_base)  # fmt: skip
        self.gate = NormalizedGate(cfg.dim)
        # "residual": y is norm(x + attention), the attention sublayer's result in the residual
        # stream; the memory then writes in the space its queries read from (norm(x)).
        # "input": y is norm(x) itself, what MAG's memory writes (see TitansConfig).
        self.memory_input = cfg.mac_memory_input
        self.write_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps) if cfg.mac_memory_input == "residual" else None
        # "attention": the gate's y side is the attention output itself (see TitansConfig)
        self.gate_takes_attention = cfg.mac_gate_input == "attention"
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        state = state or BlockState()
        B, T, _ = x.shape
        u = self.norm(x)
        # Validate once here; the segment loop then uses the memory's unchecked entry points (its
        # per-call checks were a full isfinite pass and a host sync per segment, twice).
        self.memory.check_input(u, state.memory)
        # The read side's and the attention's projections depend on u alone: computed for all of
        # it at once; each segment then only reads with its own weights, attends and memorises.
        queries = self.memory.read_queries(u, state.query_conv)
        mem, cache, seg_w = state.memory, state.attn, state.segment_weights
        if cache is None:
            cache = self.attn.empty_cache(B, u.device, u.dtype)
        aq, ak, av = self.attn.project(u, cache.position)
        prefix = self.attn.prefix_keys(u.dtype)
        # Spans up to each segment end. Split, not sliced in the loop: a slice's backward
        # zero-fills a gradient the size of the whole input, once per segment (quadratic in T);
        # one split node gathers every span's gradient at once.
        sizes, t, pos = [], 0, state.position
        while t < T:
            sizes.append(min(self.segment - pos % self.segment, T - t))
            t, pos = t + sizes[-1], pos + sizes[-1]
        pos, ys, attended, answers = state.position, [], [], []
        spans = zip(sizes, queries.split(sizes), *(z.split(sizes, dim=1) for z in (aq, ak, av, x, u)))
        for n, q_s, aq_s, ak_s, av_s, x_s, u_s in spans:
            if pos % self.segment == 0:  # a new segment reads the memory as it is now
                seg_w = self.memory.read_weights(mem, B)
            if self._compiled_segment_applies(n, mem):
                # the whole segment as one compiled graph; it leaves no open segment to cache
                y, a, answer, mem = _segment_step_compiled(
                    self, q_s, aq_s, ak_s, av_s, x_s, u_s, torch.arange(pos, pos + n, device=u.device),
                    mem, prefix, self.attn.segment_mask(n, 0 if prefix[0] is None else prefix[0].shape[1], u.device),
                    u.dtype,
                )  # fmt: skip
                cache = replace(self.attn.empty_cache(B, u.device, u.dtype), position=pos + n)
                ys.append(y), attended.append(a), answers.append(answer)
                pos += n
                continue
            h = self.memory.read(q_s, seg_w, u.dtype)
            a, cache = self.attn.attend(aq_s, ak_s, av_s, cache, h, prefix)
            y = self._write_input(x_s, u_s, a)
            # The op checks the caller's state on the first segment; later ones carry its own.
            answer, mem = self.memory.memorize(y, mem, check_state=pos == state.position)
            ys.append(y)
            attended.append(a)
            answers.append(answer)
            pos += n
        # The output paths (the memory's gated projection of M*(y), the gate y ⊗ M*(y)) hold no
        # state: once over the whole input, not per segment.
        y = torch.cat(ys, dim=1)
        gate_y = torch.cat(attended, dim=1) if self.gate_takes_attention else y
        x = x + self.gate(gate_y, self.memory.output(torch.cat(answers, dim=1), y))
        x = x + self.ffn(self.ffn_norm(x))
        return x, BlockState(memory=mem, attn=cache, query_conv=queries.conv, segment_weights=seg_w, position=pos)

    def _compiled_segment_applies(self, n: int, mem) -> bool:
        """Whether this span runs as ``_segment_step`` through ``torch.compile``: inference with
        the memory's compile switch on (``TitansLM.set_memory_compile``), a whole segment (spans
        end at segment boundaries, so it starts at one, with no open segment in the cache), made
        of whole memory chunks (so the memory, too, starts it at a chunk boundary), and a memory
        state to start from. Anything else (a partial segment, the first segment of a stream,
        training) takes the eager loop."""
        return (
            self.memory.use_compile
            and not torch.is_grad_enabled()
            and n == self.segment
            and self.segment % self.memory.chunk_size == 0
            and mem is not None
        )

    def _write_input(self, x: Tensor, u: Tensor, a: Tensor) -> Tensor:
        """y, what the memory writes (``mac_memory_input``): the attention output a, the residual
        stream after it norm(x + a), or the block's normalised input u = norm(x)."""
        if self.memory_input == "residual":
            return self.write_norm(x + a)
        return u if self.memory_input == "input" else a

    def _segment_step(self, q_s: MemoryQueries, aq_s, ak_s, av_s, x_s, u_s, positions, mem, prefix, mask, dtype):
        """One whole segment from its start, the loop body of ``forward`` for a fresh segment with
        no Python number that changes from segment to segment (positions come as a tensor), so
        that ``torch.compile`` traces it once and replays it for every segment of a stream:
        read the memory, attend over ``[P || h || x]``, memorise. Returns ``(y, a, answers, mem)``.

        Why: a single stream of 4-token memory chunks is bound by per-operation overhead (a few
        hundred small ops per segment); one graph per segment removes most of that overhead
        (docs/speed.md)."""
        h = self.memory.read(q_s, self.memory.read_weights(mem, x_s.shape[0]), dtype)
        hk, hv = self.attn.keys(h, positions)
        a = self.attn.segment_block(aq_s, ak_s, av_s, hk, hv, prefix, mask)
        y = self._write_input(x_s, u_s, a)
        # compile_group=False: the chunk loop is traced into this graph, not compiled on its own
        answer, mem = self.memory.memorize(y, mem, check_state=False, compile_chunks=False)
        return y, a, answer, mem

    # ---- one-token decoding ------------------------------------------------------------------

    def step_state(self, state: BlockState, batch_size: int, dtype: torch.dtype) -> "MACStep | None":
        """``state`` as ``step`` takes it, or None when the state cannot continue by the one-token
        step (no memory yet: the stream's first call; or a state that does not fit this block,
        which the general path then explains). The Python part of a decode step: which weights
        the token reads (a new segment reads the memory as it is now) and where its gradient is
        taken (a new memory chunk takes it at the current weights); the open segment's keys
        padded to ``segment`` slots, so that every token of a stream has the same shapes."""
        cache = state.attn
        slot = state.position % self.segment
        memory = self.memory.step_state(state.memory, batch_size)
        inner = self.memory.heads * self.memory.head_dim
        qtail = None if not self.memory.conv_kernel else (batch_size, self.memory.conv_kernel - 1, inner)
        if (
            memory is None
            or not isinstance(cache, KVCache)
            or (None if state.query_conv is None else tuple(state.query_conv.shape)) != qtail
            or (slot and state.segment_weights is None)
            or any(
                t is None or t.shape != (batch_size, slot, self.attn.heads, self.attn.head_dim) or t.dtype != dtype
                for t in (cache.k, cache.v, cache.mem_k, cache.mem_v)
            )
        ):
            return None
        # a new segment reads the memory as it is now (a copy: see ``distinct``)
        read = self.memory.read_weights(state.memory, batch_size) if slot == 0 else state.segment_weights
        seg_w = distinct(read, memory.weights + memory.chunk_weights)
        kv = (cache.k, cache.v, cache.mem_k, cache.mem_v) if slot else (cache.k[:, :0],) * 4
        k, v, mem_k, mem_v = (self._padded(t) for t in kv)
        position = torch.tensor(state.position, device=k.device)
        return MACStep(memory, standard_strides(state.query_conv), seg_w, k, v, mem_k, mem_v, position)

    def _padded(self, t: Tensor) -> Tensor:
        """The open segment's keys or values ``[B, n, H, D]`` in ``segment`` slots: a view of the
        buffer ``state_after_step`` sliced them from when they are the first slots of such a
        contiguous buffer (its later slots hold stale keys, which ``step`` masks; ``step`` writes
        out of place, so the buffer itself is never changed), else a zero-padded copy."""
        B, _, H, D = t.shape
        full = (B, self.segment, H, D)
        strides = (self.segment * H * D, H * D, D, 1)
        if (
            t.stride() == strides
            and t.storage_offset() == 0
            and t.untyped_storage().nbytes() >= B * self.segment * H * D * t.element_size()
        ):
            return t.as_strided(full, strides)
        return F.pad(t, (0, 0, 0, 0, 0, self.segment - t.shape[1]))

    def state_after_step(self, state: BlockState, step: "MACStep") -> BlockState:
        """The state after ``step`` continued ``state``."""
        pos = state.position + 1
        memory = self.memory.state_after_step(state.memory, step.memory)
        keep = pos % self.segment  # tokens of the open segment after this one (0: it closed)
        k, v, mem_k, mem_v = (b[:, :keep] for b in (step.k, step.v, step.mem_k, step.mem_v))
        cache = KVCache(k, v, position=pos, mem_k=mem_k, mem_v=mem_v)
        return BlockState(memory=memory, attn=cache, query_conv=step.query_conv,
                          segment_weights=step.segment_weights, position=pos)  # fmt: skip

    def step(self, x: Tensor, state: "MACStep") -> tuple[Tensor, "MACStep"]:
        """``forward`` for one token x ``[B, 1, dim]`` after ``state`` (from ``step_state``), with
        no Python number that changes from token to token, so one compiled graph serves a whole
        stream. The keys of the segment so far sit in slots ``< slot`` of the padded caches
        ``[B, segment, H, D]``; this token's are written at ``slot``."""
        attn, mem = self.attn, self.memory
        slot = state.position % self.segment
        u = self.norm(x)
        queries = mem.step_read_queries(u, state.query_conv)
        h = mem.read(queries, state.segment_weights, u.dtype)  # (B, 1, dim): read, no write
        positions = state.position.reshape(1)
        q = apply_rotary(attn.split_heads(attn.to_q(u)), positions, attn.rope_base)
        new = (*attn.keys(u, positions), *attn.keys(h, positions))  # k, v, hk, hv: (B, 1, H, D)
        at = slot.reshape(1)
        bufs = (state.k, state.v, state.mem_k, state.mem_v)
        k, v, mem_k, mem_v = (buf.index_copy(1, at, t) for buf, t in zip(bufs, new))
        seen = torch.arange(self.segment, device=x.device) <= slot  # the segment so far and itself
        a = attn.attend_one(q, [mem_k, k], [mem_v, v], [seen, seen])
        y = self._write_input(x, u, a)
        answer, memory = mem.step_memorize(y, state.memory)
        x = x + self.gate(a if self.gate_takes_attention else y, mem.output(answer, y))
        x = x + self.ffn(self.ffn_norm(x))
        return x, MACStep(memory, queries.conv, state.segment_weights, k, v, mem_k, mem_v, state.position)


@dataclass
class MACStep:
    """MAC's one-token step state: plain tensors (see ``MACBlock.step``).

    memory: the memory's step state. query_conv: the query stream's convolution tail.
    segment_weights: the memory's weights at the segment's start (what h reads).
    k, v, mem_k, mem_v: the open segment's keys and values of x and of h in ``segment`` slots
    ``[B, segment, H, D]``, the first ``position % segment`` of them real.
    position: the token's position (0-dim tensor).
    """

    memory: MemoryStep
    query_conv: Tensor | None
    segment_weights: tuple[Tensor, ...]
    k: Tensor
    v: Tensor
    mem_k: Tensor
    mem_v: Tensor
    position: Tensor


_COMPILED_STEP: list = []


def _segment_step_compiled(block: MACBlock, *args):
    """``MACBlock._segment_step`` through ``torch.compile``, built on first use (importing the
    compiler costs seconds) and shared by every MAC block: the blocks' parameters are inputs of
    the graph, so blocks of one shape share it (dynamic=False: a stream's segments are alike)."""
    if not _COMPILED_STEP:
        _COMPILED_STEP.append(torch.compile(MACBlock._segment_step, dynamic=False))
    return _COMPILED_STEP[0](block, *args)
