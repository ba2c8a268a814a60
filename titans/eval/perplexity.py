"""Perplexity on held-out text, each document streamed whole through the model with its state
(never cut into unrelated windows), and perplexity as a function of position in the document
(the curve of the paper's Figure 7): the negative log-likelihood of every token is added to the
bucket of its position, so a model that uses its long context shows a falling curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .report import EvalResult, EvalSettingError, fmt, format_table, length_label, new_figure, save_figure
from .streaming import token_nll

__all__ = ["plot_ppl_by_position", "position_edges", "run_perplexity", "shard_documents", "text_file_documents"]


def position_edges(max_len: int, first: int = 64) -> list[int]:
    """Bucket edges 0, first, 2*first, 4*first, ... up to the first edge >= ``max_len``."""
    if max_len < 1 or first < 1:
        raise ValueError(f"max_len and first must be >= 1, got {max_len} and {first}")
    edges = [0, first]
    while edges[-1] < max_len:
        edges.append(edges[-1] * 2)
    return edges


def text_file_documents(paths: Sequence[str | Path], tokenizer) -> Iterable[list[int]]:
    """Each text file is one document (a book, an article), tokenised whole when reached. Missing
    files are reported at once, before any scoring."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"text file(s) not found: {', '.join(missing)}")

    def docs():
        for path in paths:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise EvalSettingError(f"{path} is not UTF-8 text ({err})") from err
            ids = tokenizer.encode(text)
            if not ids:
                raise EvalSettingError(f"{path} holds no text (it tokenizes to zero tokens)")
            yield ids

    return docs()


def _spec_key(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "path"}  # the same model file may live elsewhere


def shard_documents(data_dir: str | Path, split: str = "val", tokenizer=None) -> Iterable[np.ndarray]:
    """Documents of a split prepared by ``titans data prepare`` (memory-mapped, checksums
    verified), each without its eos. ``tokenizer``, when given, must be the shards' tokenizer."""
    from ..data.text import TokenSplit

    tokens = TokenSplit(data_dir, split)
    if tokenizer is not None and _spec_key(tokens.manifest["tokenizer"]) != _spec_key(tokenizer.to_spec()):
        raise EvalSettingError(
            f"shards in {data_dir} were tokenised with {tokens.manifest['tokenizer'].get('name')!r}, "
            f"the model uses {tokenizer.to_spec().get('name')!r}: prepare the data with the model's tokenizer"
        )
    return tokens.iter_documents()


def run_perplexity(
    model,
    documents: Iterable[Sequence[int]],
    *,
    tokenizer=None,
    chunk_tokens: int = 4096,
    edges: Sequence[int] | None = None,
    max_tokens: int | None = None,
    max_docs: int | None = None,
    bos_id: int | None = None,
    model_name: str | None = None,
    source: str = "",
    progress: bool = True,
) -> EvalResult:
    """Token perplexity over ``documents`` (1-D token id sequences) and per position bucket.

    Each document is read from a fresh state in ``chunk_tokens`` pieces. ``bos_id`` (default:
    the tokenizer's eos, the separator the shards put before every document) is prepended so
    that the document's first token is scored too. ``max_tokens`` caps the scored tokens (the
    last document is cut), ``max_docs`` the documents. With a tokenizer, bits per byte of the
    scored text are reported as well (comparable across tokenizers).
    """
    if bos_id is None and tokenizer is not None:
        bos_id = tokenizer.eos_id
    if edges is not None:
        edges = _check_edges(edges)
    docs, nll_sum, count, n_bytes = 0, 0.0, 0, 0
    bucket_nll: dict[int, float] = {}
    bucket_count: dict[int, int] = {}
    longest = 0
    records = []
    bar = tqdm(desc="ppl", unit="tok", unit_scale=True, disable=not progress, total=max_tokens)
    for doc in documents:
        if max_docs is not None and docs >= max_docs:
            break
        doc = torch.as_tensor(np.asarray(doc), dtype=torch.long).reshape(-1)
        if max_tokens is not None:
            doc = doc[: max_tokens - count]
        ids = doc if bos_id is None else torch.cat([torch.tensor([bos_id]), doc])
        if ids.numel() < 2:
            continue  # nothing to score: a one-token document without a separator before it
        nll, _, _ = token_nll(model, ids, chunk_tokens)
        nll = nll[0].double().cpu()
        # position of each scored token in the document (tokens before it in the document)
        pos = torch.arange(nll.numel()) + (0 if bos_id is not None else 1)
        for b, value, n in _bucketize(pos, nll, edges):
            bucket_nll[b] = bucket_nll.get(b, 0.0) + value
            bucket_count[b] = bucket_count.get(b, 0) + n
        doc_bytes = len(tokenizer.decode(doc.tolist()).encode("utf-8")) if tokenizer is not None else 0
        records.append(dict(doc=docs, tokens=int(nll.numel()), nll=float(nll.sum()), bytes=doc_bytes))
        docs, nll_sum, count, n_bytes = docs + 1, nll_sum + float(nll.sum()), count + nll.numel(), n_bytes + doc_bytes
        longest = max(longest, int(pos[-1]) + 1)
        bar.update(nll.numel())
        if max_tokens is not None and count >= max_tokens:
            break
    bar.close()
    if count == 0:
        raise EvalSettingError(f"no tokens to score in {source or 'the documents'}")
    edges = edges if edges is not None else position_edges(longest)
    name = model_name or model.cfg.variant
    rows = []
    for b in sorted(bucket_nll):
        lo, hi = edges[b], (edges[b + 1] if b + 1 < len(edges) else None)  # None: open-ended
        mean = bucket_nll[b] / bucket_count[b]
        rows.append(dict(model=name, kind="bucket", start=lo, end=hi, tokens=bucket_count[b], nll=mean,
                         ppl=math.exp(min(mean, 700))))  # fmt: skip
    mean = nll_sum / count
    overall = dict(model=name, kind="overall", start=0, end=longest, tokens=count, nll=mean,
                   ppl=math.exp(min(mean, 700)), bpb=(nll_sum / math.log(2) / n_bytes) if n_bytes else None,
                   documents=docs, source=source)  # fmt: skip
    rows.insert(0, overall)
    return EvalResult(task="ppl", rows=rows, records=records, table=ppl_table(rows),
                      meta=dict(source=source, chunk_tokens=chunk_tokens, edges=edges, max_tokens=max_tokens,
                                max_docs=max_docs, bos_id=bos_id))  # fmt: skip


def _check_edges(edges: Sequence[int]) -> list[int]:
    edges = [int(e) for e in edges]
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise EvalSettingError(f"bucket edges must start at 0 and increase, got {edges}")
    return edges


def _bucketize(pos: torch.Tensor, nll: torch.Tensor, edges: Sequence[int] | None):
    """(bucket index, summed nll, count) of the buckets the positions fall in. Bucket i covers
    [edges[i], edges[i+1]); the last one is open-ended. Without edges, ``position_edges`` (the
    same doubling sequence for every document, so indices agree across documents)."""
    edges = position_edges(int(pos[-1]) + 1) if edges is None else edges
    idx = torch.bucketize(pos, torch.tensor(edges), right=True) - 1
    sums = torch.zeros(len(edges), dtype=torch.float64).index_add_(0, idx, nll)
    counts = torch.bincount(idx, minlength=len(edges))
    return [(i, float(sums[i]), int(counts[i])) for i in range(len(edges)) if counts[i]]


def bucket_label(row: dict) -> str:
    """'64-128' for a bucket row, '4K+' for an open last bucket, 'all' for the overall row."""
    if row["kind"] == "overall":
        return "all"
    start = length_label(row["start"])
    return f"{start}-{length_label(row['end'])}" if row["end"] else f"{start}+"


def ppl_table(rows: list[dict]) -> str:
    """Per model: the whole-document perplexity ('all', with bits per byte) and one line per
    position bucket."""
    body = [[r["model"], bucket_label(r), r["tokens"], fmt(r["nll"], 4), fmt(r["ppl"], 3), fmt(r.get("bpb"), 4)]
            for r in rows]  # fmt: skip
    sources = list(dict.fromkeys(r["source"] for r in rows if r.get("source")))
    title = "Perplexity" + (f" on {'; '.join(sources)}" if sources else "") + " (documents streamed whole)"
    return format_table(["Model", "Position", "Tokens", "NLL", "PPL", "Bits/byte"], body, title=title)


def plot_ppl_by_position(rows: list[dict], path, title: str | None = None) -> str:
    """Perplexity against position in the document, one point per bucket (at its midpoint, log
    scale, labelled with the bucket's range), one line per model."""
    buckets = [r for r in rows if r["kind"] == "bucket"]
    if not buckets:
        raise ValueError("no position buckets to plot")

    def mid(r: dict) -> float:  # an open last bucket is drawn at 1.5x its start
        return max((r["start"] + (r["end"] or 2 * r["start"])) / 2, 0.5)

    fig, ax = new_figure(figsize=(7, 4), layout="constrained")
    for model in dict.fromkeys(r["model"] for r in buckets):
        pts = [(mid(r), r["ppl"]) for r in buckets if r["model"] == model]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
    ticks = {mid(r): bucket_label(r) for r in buckets}
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), list(ticks.values()), rotation=30)
    ax.minorticks_off()
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "Perplexity by position")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
