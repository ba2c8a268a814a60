"""Build the batch sources of a run from its ``data`` config.

text: token shards from ``titans data prepare`` (``data.path``), or the built-in corpus prepared
on first use into the cache with the configured tokenizer. niah / recall / mqar: generated on the fly
(``data.options`` are passed to the generator). Evaluation batches come from the held-out split
(text) or from a generator seeded apart from training (niah / recall / mqar).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from ..data.stream import rank_rows
from ..io.config_files import ConfigError

__all__ = ["build_tokenizer", "build_sources"]

EvalBatches = Callable[[], Iterator]
_EVAL_SEED_OFFSET = 1_000_003


def build_tokenizer(spec: str):
    """bytes | sentencepiece[:PATH] (for generated data; a BPE must be trained on a corpus)."""
    from ..data.tokenizers import load_tokenizer, parse_tokenizer_arg

    try:
        request = parse_tokenizer_arg(spec)
        if request["name"] == "bpe":
            raise ValueError("a BPE is trained on text: use it with data.kind=text")
        return load_tokenizer(request)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.tokenizer={spec!r}: {err}") from err


def _prepared_builtin(tokenizer_spec: str) -> Path:
    """The built-in corpus tokenised with ``tokenizer_spec``, prepared once into the cache (the
    directory appears complete or not at all: prepare writes its manifest last)."""
    from ..data import text
    from ..data.corpus import builtin_corpus
    from ..data.packages import cache_root
    from ..data.tokenizers import load_tokenizer, parse_tokenizer_arg

    try:
        request = parse_tokenizer_arg(tokenizer_spec)
    except ValueError as err:
        raise ConfigError(f"data.tokenizer={tokenizer_spec!r}: {err}") from err
    safe = tokenizer_spec.replace("/", "_").replace(":", "-")
    out = cache_root() / "prepared" / f"builtin-{safe}"
    if not (out / "manifest.json").is_file():
        corpus = builtin_corpus()
        if request["name"] == "bpe":
            tokenizer = text.train_bpe_on_corpus([corpus], request["vocab_size"])
        else:
            tokenizer = load_tokenizer(request)
        text.prepare([corpus], out, tokenizer, overwrite=True)
    return out


def prepared_text_dir(data) -> Path:
    """The shard directory of a text data config (the built-in corpus is prepared on first use)."""
    path = Path(data.path) if data.path else _prepared_builtin(data.tokenizer)
    if not path.exists():
        raise ConfigError(f"data.path {path} does not exist (make it with `titans data prepare`)")
    return path


def build_sources(run, rank: int = 0, world_size: int = 1):
    """``(tokenizer, train_source, eval_batches)``: eval_batches() yields the same evaluation
    batches (this rank's rows) every call."""
    data, train = run.data, run.train
    rows = train.eval_rows
    if rows % world_size:
        raise ConfigError(f"train.eval_rows ({rows}) must be divisible by the number of processes ({world_size})")
    if data.kind == "text":
        from ..data.text import DataError, PackedTextSource
        from ..data.tokenizers import load_tokenizer

        if data.options:
            raise ConfigError(f"data.options are for generated data (niah, mqar); text takes none: {data.options}")
        path = prepared_text_dir(data)
        kw = dict(seq_len=train.seq_len, seed=train.seed, rank=rank, world_size=world_size)
        try:
            source = PackedTextSource(path, "train", **kw)
        except (DataError, FileNotFoundError) as err:
            raise ConfigError(f"data.path {path}: {err}") from err
        tokenizer = load_tokenizer(source.tokenizer_spec)  # the shards' own tokenizer

        def eval_batches():
            mine = rank_rows(rows, rank, world_size)
            for batch in source.iter_eval_batches(rows, max_batches=train.eval_batches):
                if len(batch) == rows:  # every rank takes its rows of full batches only
                    yield batch[mine]

        # an evaluation that finds no full batch would report NaN at every eval step: refuse now
        try:
            first = next(source.iter_eval_batches(rows, max_batches=1), None)
        except (DataError, FileNotFoundError) as err:
            raise ConfigError(f"data.path {path}: the val split cannot be read for evaluation: {err}") from err
        if first is None or len(first) < rows:
            held = 0 if first is None else len(first)
            raise ConfigError(
                f"data.path {path}: the val split holds {held} row(s) of {train.seq_len + 1} tokens, fewer than one "
                f"evaluation batch of train.eval_rows={rows}: lower train.eval_rows or train.seq_len, or prepare the "
                f"data with a larger --val-fraction"
            )
        return tokenizer, source, eval_batches

    tokenizer = build_tokenizer(data.tokenizer)

    from ..tasks import train_sources

    klass = {"niah": train_sources.NiahTrainSource, "recall": train_sources.RecallTrainSource,
             "mqar": train_sources.MQARTrainSource}[data.kind]  # fmt: skip

    def make(seed):
        try:
            if data.kind == "mqar":
                return klass(seq_len=train.seq_len, seed=seed, rank=rank, world_size=world_size, **data.options)
            return klass(tokenizer, train.seq_len, seed, rank=rank, world_size=world_size, **data.options)
        except TypeError as err:
            raise ConfigError(f"data.options for {data.kind}: {err}") from err

    source = make(train.seed)

    def eval_batches():
        held_out = make(train.seed + _EVAL_SEED_OFFSET)
        for _ in range(train.eval_batches):
            yield held_out.next_batch(rows)

    return tokenizer, source, eval_batches


def as_inputs(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) on ``device`` from a tensor batch or a dict batch."""
    if isinstance(batch, dict):
        return batch["input_ids"].to(device), batch["labels"].to(device)
    batch = batch.to(device)
    return batch, batch
