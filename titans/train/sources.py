"""Build the batch sources of a run from its ``data`` config.

text: token shards from ``titans data prepare`` (``data.path``), or the built-in corpus prepared
on first use into the cache with the configured tokenizer. niah / mqar: generated on the fly
(``data.options`` are passed to the generator). Evaluation batches come from the held-out split
(text) or from a generator seeded apart from training (niah / mqar).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from ..config_files import ConfigError

__all__ = ["build_tokenizer", "build_sources"]

EvalBatches = Callable[[], Iterator]
_EVAL_SEED_OFFSET = 1_000_003


def build_tokenizer(spec: str):
    from ..data import tokenizers

    try:
        return tokenizers.tokenizer_from_string(spec)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.tokenizer={spec!r}: {err}") from err


def _prepared_builtin(tokenizer_spec: str, tokenizer) -> Path:
    from ..data.corpus import builtin_corpus
    from ..data.packages import cache_root
    from ..data.text import prepare

    safe = tokenizer_spec.replace("/", "_").replace(":", "-")
    out = cache_root() / "prepared" / f"builtin-{safe}"
    if not (out / "manifest.json").is_file():
        prepare([builtin_corpus()], out, tokenizer)
    return out


def build_sources(run, rank: int = 0, world_size: int = 1):
    """``(tokenizer, train_source, eval_batches)``: eval_batches() yields the same evaluation
    batches (this rank's rows) every call."""
    data, train = run.data, run.train
    tokenizer = build_tokenizer(data.tokenizer)
    if data.kind == "text":
        from ..data.text import PackedTextSource

        if data.options:
            raise ConfigError(f"data.options are for generated data (niah, mqar); text takes none: {data.options}")
        path = Path(data.path) if data.path else _prepared_builtin(data.tokenizer, tokenizer)
        if not path.exists():
            raise ConfigError(f"data.path {path} does not exist (make it with `titans data prepare`)")
        kw = dict(seq_len=train.seq_len, seed=train.seed, rank=rank, world_size=world_size)
        source = PackedTextSource(path, "train", **kw)
        val = PackedTextSource(path, "val", **kw)
        rows = train.micro_batch * world_size

        def eval_batches():
            yield from val.iter_eval_batches(rows, max_batches=train.eval_batches)

        return tokenizer, source, eval_batches

    from ..tasks import train_sources

    klass = {"niah": train_sources.NiahTrainSource, "mqar": train_sources.MQARTrainSource}[data.kind]

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
            yield held_out.next_batch(train.micro_batch * world_size)

    return tokenizer, source, eval_batches


def as_inputs(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) on ``device`` from a tensor batch or a dict batch."""
    if isinstance(batch, dict):
        return batch["input_ids"].to(device), batch["labels"].to(device)
    batch = batch.to(device)
    return batch, batch
