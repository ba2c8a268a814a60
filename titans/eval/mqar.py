"""Multi-query associative recall (Zoology's MQAR): key-value pairs, then queries of the keys at
power-law gaps; accuracy = the fraction of queried values the model predicts (argmax) correctly.
Token ids are used directly (no tokenizer): keys in [1, V/2), values in [V/2, V)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .report import EvalResult, EvalSettingError, fmt, format_table, generated, length_label
from .streaming import greedy_predictions

__all__ = ["count_correct", "mqar_table", "run_mqar"]


def count_correct(preds: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """``preds`` ``[B, T]`` argmax ids (``[:, t]`` guesses token t + 1), ``labels`` ``[B, T]`` with
    -100 where nothing is asked (the model's HF alignment). Returns (correct, asked)."""
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
    target = labels[:, 1:].to(preds.device)
    asked = target != -100
    return int(((preds[:, :-1] == target) & asked).sum()), int(asked.sum())


def run_mqar(
    model,
    seq_lens: Sequence[int] = (256,),
    num_pairs: Sequence[int] = (16,),
    *,
    samples: int = 256,
    vocab_size: int | None = None,
    power_a: float = 0.01,
    seed: int = 0,
    batch_size: int = 32,
    chunk_tokens: int = 4096,
    model_name: str | None = None,
    progress: bool = True,
    generate: Callable | None = None,
) -> EvalResult:
    """Accuracy (%) over queried positions for every (sequence length, number of pairs).
    ``vocab_size`` defaults to min(8192, the model's vocabulary); it may not exceed it."""
    if generate is None:
        from ..tasks.mqar import generate_mqar as generate
    model_vocab = model.cfg.vocab_size
    vocab = vocab_size or min(8192, model_vocab)
    if vocab > model_vocab:
        raise EvalSettingError(f"MQAR vocab_size {vocab} exceeds the model's vocabulary ({model_vocab})")
    if samples < 1 or batch_size < 1:
        raise EvalSettingError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    rows, records = [], []
    bar = tqdm(total=len(seq_lens) * len(num_pairs) * samples, desc="mqar", unit="sample", disable=not progress)
    for seq_len in seq_lens:
        for pairs in num_pairs:
            ids, labels = generated(f"MQAR at seq_len {seq_len} with {pairs} pairs", generate, samples,
                                    vocab_size=vocab, seq_len=seq_len, num_pairs=pairs, power_a=power_a,
                                    seed=seed)  # fmt: skip
            correct = asked = 0
            for start in range(0, samples, batch_size):
                preds, _ = greedy_predictions(model, ids[start : start + batch_size], chunk_tokens)
                c, a = count_correct(preds, labels[start : start + batch_size])
                correct, asked = correct + c, asked + a
                bar.update(min(batch_size, samples - start))
            if asked == 0:
                raise EvalSettingError(f"MQAR samples at seq_len {seq_len}, {pairs} pairs ask no queries")
            rows.append(dict(model=model_name or model.cfg.variant, seq_len=int(seq_len), num_pairs=int(pairs),
                             vocab_size=vocab, samples=samples, queries=asked, accuracy=100.0 * correct / asked))
    bar.close()
    return EvalResult(
        task="mqar", rows=rows, records=records, table=mqar_table(rows),
        meta=dict(seq_lens=list(seq_lens), num_pairs=list(num_pairs), samples=samples, vocab_size=vocab,
                  power_a=power_a, seed=seed, chunk_tokens=chunk_tokens),
    )  # fmt: skip


def mqar_table(rows: list[dict]) -> str:
    """One line per model and sequence length, one column per number of key-value pairs: accuracy (%)."""
    lines = list(dict.fromkeys((r["model"], r["seq_len"]) for r in rows))
    pairs = sorted({r["num_pairs"] for r in rows})
    acc = {(r["model"], r["seq_len"], r["num_pairs"]): r["accuracy"] for r in rows}
    body = [[m, length_label(t)] + [fmt(acc.get((m, t, p))) for p in pairs] for m, t in lines]
    return format_table(["Model", "Seq len"] + [f"{p} pairs" for p in pairs], body, title="MQAR accuracy (%)")
