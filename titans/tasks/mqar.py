"""Multi-query associative recall (MQAR), as in the Zoology benchmark (Arora et al., 2023).

A sequence starts with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys drawn from
``[1, V/2)``, values from ``[V/2, V)``, distinct within a sequence); then every key is queried
once, at a gap from the pairs drawn from a power law ``p(g) ~ a * g^(a - 1)`` (small ``a``: most
queries come soon, a few far away). All other positions hold random tokens. The model must emit
the key's value right after each query; accuracy counts only those positions.

Labels follow the model's (Hugging Face) alignment: ``labels[:, t + 1]`` is the target of the
logits at position ``t``, so a query key at position ``q`` puts its value in ``labels[:, q + 1]``
(the input there stays a random token, as in Zoology) and ``model(input_ids, labels=labels)``
trains exactly the recall.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["generate_mqar", "mqar_accuracy"]


def _check(vocab_size: int, seq_len: int, num_pairs: int, power_a: float) -> int:
    """Validate the configuration; returns the number of query gaps (slots)."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if vocab_size // 2 - 1 < num_pairs:
        raise ValueError(
            f"vocab_size {vocab_size} has {vocab_size // 2 - 1} key ids [1, {vocab_size // 2}) "
            f"for {num_pairs} distinct keys"
        )
    slots = (seq_len - 2 * num_pairs) // 2
    if slots < num_pairs:
        raise ValueError(
            f"seq_len {seq_len} is too short for {num_pairs} pairs and their queries (needs >= {4 * num_pairs})"
        )
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    return slots


def generate_mqar(
    num_samples: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 256,
    num_pairs: int = 16,
    power_a: float = 0.01,
    seed: int | Sequence[int] = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both LongTensor ``[num_samples, seq_len]``; labels are -100 except
    the ``num_pairs`` value targets per row. Deterministic for ``seed`` (an int or a sequence of
    ints, as ``numpy.random.default_rng`` takes)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    slots = _check(vocab_size, seq_len, num_pairs, power_a)
    rng = np.random.default_rng(seed)
    half, context = vocab_size // 2, 2 * num_pairs
    keys = np.stack([rng.choice(np.arange(1, half), num_pairs, replace=False) for _ in range(num_samples)])
    values = np.stack([rng.choice(np.arange(half, vocab_size), num_pairs, replace=False) for _ in range(num_samples)])

    # Query gaps: num_pairs distinct slots per row, drawn without replacement from the power law
    # (Gumbel top-k: the k largest of log p + Gumbel noise are such a draw).
    log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, slots + 1))
    scores = log_p + rng.gumbel(size=(num_samples, slots))
    gaps = np.argpartition(-scores, num_pairs - 1, axis=1)[:, :num_pairs]  # [N, num_pairs]

    ids = rng.integers(0, vocab_size, size=(num_samples, seq_len))  # random filler, as Zoology
    ids[:, 0:context:2], ids[:, 1:context:2] = keys, values
    query_pos = context + 2 * gaps  # the key is re-read here ...
    rows = np.arange(num_samples)[:, None]
    ids[rows, query_pos] = keys
    labels = np.full((num_samples, seq_len), -100, dtype=np.int64)
    labels[rows, query_pos + 1] = values  # ... and its value is the next token's target
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels)


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of labelled positions where ``logits[:, t]`` (``[N, T, V]``) has its argmax at
    ``labels[:, t + 1]`` (``[N, T]``, -100 = not scored)."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"need logits [N, T, V] and labels [N, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    target = labels[:, 1:].to(logits.device)
    mask = target != -100
    if not mask.any():
        raise ValueError("labels have no scored position (all -100)")
    pred = logits[:, :-1].argmax(dim=-1)
    return (pred[mask] == target[mask]).float().mean().item()
