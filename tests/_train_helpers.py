"""A tiny deterministic batch source and run config for trainer tests (no data files needed)."""

from __future__ import annotations

import torch

from titans.data.stream import rank_rows
from titans.data.tokenizers import ByteTokenizer
from titans.train.config import DataConfig, RunConfig, TrainConfig
from titans.model import TitansConfig


class CountingSource:
    """Row i of the stream: a seeded sequence with structure (a random walk mod vocab) so the loss
    can fall. Deterministic by (seed, row index); the position is the number of rows handed out."""

    def __init__(self, seq_len: int, seed: int, rank: int = 0, world_size: int = 1, vocab: int = 64) -> None:
        self.seq_len, self.seed, self.rank, self.world_size, self.vocab = seq_len, seed, rank, world_size, vocab
        self.position = 0

    def _row(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        steps = torch.randint(1, 4, (self.seq_len + 1,), generator=g)
        return torch.cumsum(steps, 0) % self.vocab

    def next_batch(self, global_batch_size: int) -> torch.Tensor:
        rows = range(self.position, self.position + global_batch_size)[rank_rows(global_batch_size, self.rank, self.world_size)]
        self.position += global_batch_size
        return torch.stack([self._row(i) for i in rows])

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError("data state is from another seed")
        self.position = state["position"]


def fake_build_sources(run, rank=0, world_size=1):
    source = CountingSource(run.train.seq_len, run.train.seed, rank, world_size)

    def eval_batches():
        held_out = CountingSource(run.train.seq_len, run.train.seed + 999, rank, world_size)
        for _ in range(run.train.eval_batches):
            yield held_out.next_batch(run.train.eval_rows)

    return ByteTokenizer(), source, eval_batches


def tiny_run(out_dir, variant: str = "mac", **train) -> RunConfig:
    model = TitansConfig(
        variant=variant, vocab_size=257, dim=32, depth=2, heads=2, segment=16, window=16,
        memory_chunk=8, persistent_tokens=2,
    )  # fmt: skip
    t = dict(
        out_dir=str(out_dir), seq_len=32, batch_tokens=128, micro_batch=2, max_steps=6, warmup_steps=2,
        lr=3e-3, eval_every=3, eval_batches=2, log_every=1, checkpoint_every=2, progress=False, tensorboard=False,
    )  # fmt: skip
    t.update(train)
    return RunConfig(model=model, train=TrainConfig(**t), data=DataConfig())
