"""Feed long inputs through a model in pieces with its recurrent state.

A ``TitansLM`` fed a sequence in pieces, each continuing from the state the previous piece
returned, gives the outputs of one call; only the state (constant size for every variant but
Transformer++) and one piece's activations are alive at a time, so memory stays flat however
long the prompt or document. Pieces hold ``chunk_tokens`` tokens, a multiple of the model's
memory chunk (and MAC segment) so that every piece but the last ends on a chunk boundary.
Everything here runs under ``torch.inference_mode()``. A model is anything with ``TitansLM``'s
``forward(input_ids, labels=None, state=None, logits_to_keep=0) -> (logits, loss, state)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .report import EvalSettingError

__all__ = [
    "check_chunk_tokens",
    "decode_prediction",
    "greedy_continue",
    "greedy_predictions",
    "model_device",
    "prefill",
    "stream_unit",
    "token_nll",
]  # fmt: skip

MEMORY_VARIANTS = ("mac", "mag", "mal", "lmm")


def stream_unit(model) -> int:
    """The granularity pieces must respect: lcm(segment, memory chunk) for MAC, the memory
    chunk for MAG/MAL/LMM, 1 for the attention baselines."""
    cfg = model.cfg
    if cfg.variant == "mac":
        return math.lcm(cfg.segment, cfg.memory_chunk)
    if cfg.variant in MEMORY_VARIANTS:
        return cfg.memory_chunk
    return 1


def check_chunk_tokens(model, chunk_tokens: int) -> int:
    """Return ``chunk_tokens`` if it is a positive multiple of ``stream_unit(model)``, else raise."""
    unit = stream_unit(model)
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise EvalSettingError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if chunk_tokens % unit:
        cfg = model.cfg
        raise EvalSettingError(
            f"chunk_tokens={chunk_tokens} must be a multiple of {unit} for this {cfg.variant} model "
            f"(segment {cfg.segment}, memory chunk {cfg.memory_chunk}); "
            f"e.g. {max(unit, chunk_tokens // unit * unit)}"
        )
    return chunk_tokens


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _as_batch(ids, device) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"token ids must be [time] or [batch, time], got shape {tuple(ids.shape)}")
    return ids


@torch.inference_mode()
def prefill(model, ids, chunk_tokens: int, state=None) -> tuple[Tensor | None, object]:
    """Read ``ids`` ``[B, T]`` (or ``[T]``) in pieces. Returns ``(last_logits [B, V], state)``;
    ``last_logits`` is None (and the state unchanged) when ``T == 0``."""
    check_chunk_tokens(model, chunk_tokens)
    ids = _as_batch(ids, model_device(model))
    last = None
    for start in range(0, ids.shape[1], chunk_tokens):
        logits, _, state = model(ids[:, start : start + chunk_tokens], state=state, logits_to_keep=1)
        last = logits[:, -1].float()
    return last, state


@torch.inference_mode()
def token_nll(model, ids, chunk_tokens: int, state=None) -> tuple[Tensor, Tensor, object]:
    """Next-token scores of ``ids`` ``[B, T]`` read in pieces (``T >= 2``).

    Returns ``(nll [B, T-1], greedy [B, T-1], state)``: ``nll[:, t]`` is ``-log p(ids[:, t+1] |
    ids[:, :t+1])`` (float32) and ``greedy[:, t]`` whether that token is the argmax. The logits
    of a piece's last position score the next piece's first token, so the result equals one call.
    """
    check_chunk_tokens(model, chunk_tokens)
    ids = _as_batch(ids, model_device(model))
    if ids.shape[1] < 2:
        raise ValueError(f"need at least 2 tokens to score next-token predictions, got {ids.shape[1]}")
    nll, greedy, prev = [], [], None
    for start in range(0, ids.shape[1], chunk_tokens):
        logits, _, state = model(ids[:, start : start + chunk_tokens], state=state)
        logits = logits.float()
        # predictions for ids[:, max(start, 1) : end]: the previous piece's last logits, then ours
        pred = logits[:, :-1] if prev is None else torch.cat([prev[:, None], logits[:, :-1]], 1)
        target = ids[:, max(start, 1) : start + logits.shape[1]]
        if pred.shape[1]:
            nll.append(F.cross_entropy(pred.transpose(1, 2), target, reduction="none"))
            greedy.append(pred.argmax(-1) == target)
        prev = logits[:, -1]
    return torch.cat(nll, 1), torch.cat(greedy, 1), state


@torch.inference_mode()
def greedy_predictions(model, ids, chunk_tokens: int, state=None) -> tuple[Tensor, object]:
    """Argmax next-token ids ``[B, T]`` at every position of ``ids`` ``[B, T]`` read in pieces
    (``[:, t]`` is the model's guess for the token after ``ids[:, t]``), and the state."""
    check_chunk_tokens(model, chunk_tokens)
    ids = _as_batch(ids, model_device(model))
    preds = []
    for start in range(0, ids.shape[1], chunk_tokens):
        logits, _, state = model(ids[:, start : start + chunk_tokens], state=state)
        preds.append(logits.argmax(-1))
    return torch.cat(preds, 1), state


@torch.inference_mode()
def greedy_continue(
    model, prompt_ids: Sequence[int], max_new_tokens: int, chunk_tokens: int, eos_id: int | None = None
) -> list[int]:
    """Stream the prompt, then decode greedily up to ``max_new_tokens`` tokens. Returns the new
    ids, cut before the first ``eos_id``.

    All whole pieces but the prompt's tail are read by ``prefill``; the tail (1..chunk_tokens
    tokens) goes to ``model.generate`` with that state, which reads it and decodes one token
    at a time.
    """
    check_chunk_tokens(model, chunk_tokens)
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt tokenizes to zero tokens; there is nothing to continue")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n_head = (len(prompt) - 1) // chunk_tokens * chunk_tokens
    _, state = prefill(model, prompt[:n_head], chunk_tokens) if n_head else (None, None)
    tail = _as_batch(prompt[n_head:], model_device(model))
    out, _ = model.generate(tail, max_new_tokens, temperature=0.0, top_k=1, eos_token_id=eos_id, state=state)
    new = out[0, tail.shape[1] :].tolist()
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return new


def decode_prediction(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids. Defined for every output: no ids give ``""``; ids that do not form
    valid UTF-8 come back with U+FFFD replacement characters (the tokenizers decode with
    ``errors="replace"``), which match no answer."""
    if not ids:
        return ""
    text = tokenizer.decode(list(ids))
    if not isinstance(text, str):
        raise TypeError(f"{tokenizer!r}.decode returned {type(text).__name__}, expected str")
    return text
