"""MAC: memory as context (paper section 4.1, SPEC section 3).

For each segment of C tokens: read the memory as it was before the segment, h_t = M*_{s-1}(q_t)
(per token, no write); attend over ``[P || h || segment]`` (causal in h and in the segment);
write the attention outputs y into the memory token by token; output ``y ⊗ M*(y)`` with each
token's own weights (never the segment-end weights, which would show a token its future).
Segments are a loop; inside one, everything is parallel. The state carries the memory, its
weights at the segment start, the query convolution tail and the open segment's KV cache, so
any split of the sequence (one token at a time included) gives one call's outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.attention import Attention
from ..layers.neural_memory import NeuralMemory
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
        self.memory._check_input(u, state.memory)
        # The read side's and the attention's projections depend on u alone: computed for all of
        # it at once; each segment then only reads with its own weights, attends and memorises.
        queries, read_gate, qconv = self.memory._read_inputs(u, state.query_conv)
        mem, cache, seg_w = state.memory, state.attn, state.segment_weights
        if cache is None:
            cache = self.attn.empty_cache(B, u.device, u.dtype)
        aq, ak, av = self.attn.project(u, cache.position)
        prefix = self.attn._prefix(u.dtype)
        # Spans up to each segment end. Split, not sliced in the loop: a slice's backward
        # zero-fills a gradient the size of the whole input, once per segment (quadratic in T);
        # one split node gathers every span's gradient at once.
        sizes, t, pos = [], 0, state.position
        while t < T:
            sizes.append(min(self.segment - pos % self.segment, T - t))
            t, pos = t + sizes[-1], pos + sizes[-1]
        pos, ys, attended, answers = state.position, [], [], []
        spans = zip(sizes, *(z.split(sizes, dim=1) for z in (queries, read_gate, aq, ak, av, x)))
        for n, q_s, gate_s, aq_s, ak_s, av_s, x_s in spans:
            if pos % self.segment == 0:  # a new segment reads the memory as it is now
                seg_w = mem.memory.weights if mem is not None else self.memory.initial_weights_for(B)
            h = self.memory._read(q_s, gate_s, seg_w, u.dtype)
            a, cache = self.attn.attend(aq_s, ak_s, av_s, cache, h, prefix)
            y = a if self.write_norm is None else self.write_norm(x_s + a)
            # The op checks the caller's state on the first segment; later ones carry its own.
            answer, mem = self.memory._memorise_raw(y, mem, check_op=pos == state.position)
            ys.append(y)
            attended.append(a)
            answers.append(answer)
            pos += n
        # The output paths (the memory's gated projection of M*(y), the gate y ⊗ M*(y)) hold no
        # state: once over the whole input, not per segment.
        y = torch.cat(ys, dim=1)
        gate_y = torch.cat(attended, dim=1) if self.gate_takes_attention else y
        x = x + self.gate(gate_y, self.memory._output(torch.cat(answers, dim=1), y))
        x = x + self.ffn(self.ffn_norm(x))
        return x, BlockState(memory=mem, attn=cache, query_conv=qconv, segment_weights=seg_w, position=pos)
