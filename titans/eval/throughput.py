"""Throughput by sequence length: tokens per second of streaming prefill (the prompt read in
``chunk_tokens`` pieces with the state) and of one-token decoding right after it, and the size
of the state the model carries at that length (flat for every variant but Transformer++)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..inference.state_io import state_num_bytes
from .report import EvalResult, EvalSettingError, fmt, format_table, length_label, new_figure, save_figure
from .streaming import check_chunk_tokens, model_device, prefill

__all__ = ["plot_throughput", "run_throughput", "throughput_table"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _decode(model, last_logits, state, steps: int):
    nxt = last_logits.argmax(-1, keepdim=True)
    for _ in range(steps):
        logits, _, state = model(nxt, state=state)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    return state


def run_throughput(
    model,
    lengths: Sequence[int] = (1024, 4096, 16384),
    *,
    chunk_tokens: int = 4096,
    decode_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 1,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """For each length L: time to stream L random tokens (prefill tokens/s = B * L / seconds),
    then ``decode_tokens`` greedy one-token steps from that state (decode tokens/s), and the
    state's size in MB after the decode. One warm-up pass runs first and is not counted; with
    ``repeats`` > 1 each length is measured that many times and the fastest run kept (the
    least disturbed by other processes)."""
    check_chunk_tokens(model, chunk_tokens)
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise EvalSettingError(f"lengths must be positive token counts, got {lengths}")
    if min(decode_tokens, batch_size, repeats) < 1:
        raise EvalSettingError(
            f"decode_tokens, batch_size and repeats must be >= 1, got {decode_tokens}, {batch_size}, {repeats}"
        )
    device = model_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = model.cfg.vocab_size
    warm = torch.randint(0, vocab, (batch_size, min(chunk_tokens, min(lengths))), generator=gen).to(device)
    last, state = prefill(model, warm, chunk_tokens)
    _decode(model, last, state, 2)
    rows = []
    for length in tqdm(lengths, desc="throughput", unit="length", disable=not progress):
        ids = torch.randint(0, vocab, (batch_size, length), generator=gen).to(device)
        t_prefill = t_decode = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            last, state = prefill(model, ids, chunk_tokens)
            _sync(device)
            t1 = time.perf_counter()
            state = _decode(model, last, state, decode_tokens)
            _sync(device)
            t_prefill, t_decode = min(t_prefill, t1 - t0), min(t_decode, time.perf_counter() - t1)
        rows.append(dict(
            model=model_name or model.cfg.variant, length=length, batch_size=batch_size,
            prefill_seconds=t_prefill, prefill_tokens_per_s=batch_size * length / t_prefill,
            decode_tokens=decode_tokens, decode_ms_per_token=1000 * t_decode / decode_tokens,
            decode_tokens_per_s=batch_size * decode_tokens / t_decode, state_mb=state_num_bytes(state) / 2**20,
        ))  # fmt: skip
    return EvalResult(task="throughput", rows=rows, table=throughput_table(rows),
                      meta=dict(lengths=lengths, chunk_tokens=chunk_tokens, decode_tokens=decode_tokens,
                                batch_size=batch_size, repeats=repeats, device=str(device)))  # fmt: skip


def throughput_table(rows: list[dict]) -> str:
    body = [[r["model"], length_label(r["length"]), fmt(r["prefill_tokens_per_s"], 0), fmt(r["decode_tokens_per_s"], 1),
             fmt(r["decode_ms_per_token"], 2), fmt(r["state_mb"], 3)] for r in rows]  # fmt: skip
    batch = ",".join(str(b) for b in dict.fromkeys(r["batch_size"] for r in rows)) or "-"
    columns = ["Model", "Length", "Prefill tok/s", "Decode tok/s", "Decode ms/tok", "State MB"]
    return format_table(columns, body, title=f"Throughput (batch {batch})")


def plot_throughput(rows: list[dict], path, title: str | None = None) -> str:
    """Prefill and decode tokens/s against sequence length (log-log), one line per model."""
    if not rows:
        raise ValueError("no throughput rows to plot")
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter

    fig, axes = new_figure(ncols=2, figsize=(10, 4), layout="constrained")
    lengths = sorted({r["length"] for r in rows})
    for key, ax, label in (("prefill_tokens_per_s", axes[0], "streaming prefill"),
                           ("decode_tokens_per_s", axes[1], "one-token decoding")):  # fmt: skip
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r["length"], r[key]) for r in rows if r["model"] == model)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1, 2, 5 x 10^k
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("tokens / s")
        ax.set_title(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
