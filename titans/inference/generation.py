"""Generation with the full recurrent state: prefill in parallel, then one token at a time.

Nothing is ever re-run: the prompt is read once (chunk-parallel), and each new token costs one
step of every block with its state (memory weights, momentum, pending chunk, convolution tails,
KV window or segment cache). A state returned here can be saved (``titans.inference.state_io``)
and passed back later to continue where the model stopped.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["generate", "sample_next"]


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids ``[B]`` from last-position logits ``[B, V]``; temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p (the first one always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    state=None,
    generator: torch.Generator | None = None,
):
    """Continue ``input_ids`` ``[B, T]`` by up to ``max_new_tokens``. Returns ``(ids, state)``
    with ``ids`` ``[B, T + n]`` (prompt included) and the state after reading all of ``ids``, so
    that a later call continues right after them. Sequences that emitted ``eos_token_id`` keep
    emitting it; generation stops early once all have. ``state`` continues an earlier call (the
    prompt is then read after what that state has seen)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    logits, _, state = model(input_ids, state=state, logits_to_keep=1)  # prefill: last position only
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        logits, _, state = model(nxt[:, None], state=state)  # the state reads every token it returns
        if eos_token_id is not None and bool(done.all()):
            break
    return torch.cat(out, dim=1), state
