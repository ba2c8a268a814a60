"""Batch sources that train retrieval: S-NIAH documents, keyed-recall rows and MQAR sequences.

Both implement ``titans.data.stream.BatchSource``: ``next_batch(global_batch_size)`` returns this
rank's rows of the next global batch as ``{"input_ids": [B_local, seq_len + 1], "labels": [B_local,
seq_len + 1]}`` (LongTensors; labels -100 except the answer tokens, in the model's alignment:
``labels[:, t + 1]`` is the target of the logits at ``t``). Every row is a function of
``(seed, step, global row index)`` only, so the data do not depend on the number of processes, and
``state_dict()`` / ``load_state_dict()`` resume at the exact next batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.stream import rank_rows
from .mqar import _check as _check_mqar
from .mqar import generate_mqar
from .niah import VARIANTS, _builder, dense_niah_ids, niah_token_ids
from .recall import (
    HELD_OUT_HAYSTACKS, HELD_OUT_TEMPLATES, TEMPLATES, TRAIN_HAYSTACKS, VALUE_KINDS, recall_row_ids, worst_case_tokens,
)  # fmt: skip

__all__ = ["MQARTrainSource", "NiahTrainSource", "RecallTrainSource"]


def _check_resume(kind: str, mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    for name, value in mine.items():
        if name == "step":
            continue
        if name not in theirs:
            raise ValueError(f"{kind} state has no {name!r}: it was saved by another source")
        other = theirs[name]
        if isinstance(value, (list, tuple)):
            value, other = list(value), list(other)
        if other != value:
            raise ValueError(
                f"cannot resume {kind}: the state was saved with {name}={other!r}, this source has {value!r}"
            )


class _RowSource:
    """Rows ``self._row(rng) -> (ids, answer_mask)`` drawn from ``(seed, step, global row)``, scored
    by ``self.score`` and ``self.answer_weight``."""

    def next_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the next global batch: input_ids and labels, [B_local, seq_len + 1]."""
        rows = range(global_batch_size)[rank_rows(global_batch_size, self.rank, self.world_size)]
        built = [self._row(np.random.default_rng([self.seed, self.step, r])) for r in rows]
        self.step += 1
        return _scored_batch(self.tokenizer, built, self.score, self.answer_weight)


class NiahTrainSource(_RowSource):
    """S-NIAH training rows (RULER's prompt, the answer ``" {value}."`` and ``eos`` scored).

    Each row mixes a random variant of ``variants`` (see ``titans.tasks.niah.VARIANTS``), a random
    needle depth (uniform over the haystack) and a random haystack window. With
    ``min_doc_tokens=None`` a row is one document of ``seq_len + 1`` tokens; otherwise rows are
    packed with documents of random lengths in ``[min_doc_tokens, seq_len + 1]`` (several needles
    per row, separated by ``eos``), which shows the model many prompt lengths. The few tokens a
    sentence-cut haystack leaves over are ``eos`` at the start of a document (never scored).

    With ``needles=N`` every row is instead one haystack holding N needles, each asked for later
    in the row (``titans.tasks.niah.dense_niah_ids``, at least ``min_gap`` tokens after its needle
    when there is room; ``ask="latest"``: needles and questions alternate): N answers scored per
    row instead of one.

    ``score="all"`` scores every token but the leading ``eos`` padding (language modelling of the
    whole row, answers included) instead of the answers alone: the repeated haystack and the
    question lines, whose key repeats a needle's, teach copying from earlier text long before the
    answers alone would. ``answer_weight`` (with ``score="all"``) weights the answer tokens that
    many times the others in the training loss (the batch's ``loss_weights``): at 1 the answers are
    a few tokens among thousands and the loss hardly sees whether a needle was recalled.
    ``quiet_prefix`` (with ``needles``) keeps a row's first that many haystack tokens free of
    needles and questions (``dense_niah_ids``): with ``train.detached_prefix`` they stream without
    gradient, so the scored rest stores and reads its needles in a memory the haystack has filled.
    """

    def __init__(
        self,
        tokenizer,
        seq_len: int,
        seed: int,
        *,
        variants: Sequence[str] = ("pk", "n", "w"),
        rank: int = 0,
        world_size: int = 1,
        min_doc_tokens: int | None = None,
        book: str = "shakespeare",
        needles: int | None = None,
        min_gap: int = 0,
        score: str = "answers",
        ask: str = "any",
        answer_weight: float = 1.0,
        quiet_prefix: int = 0,
    ):
        if not (answer_weight >= 1.0 and answer_weight < float("inf")):
            raise ValueError(f"answer_weight must be a finite number >= 1, got {answer_weight}")
        if answer_weight != 1.0 and score != "all":
            raise ValueError("answer_weight needs score='all' (with score='answers' only answers are scored)")
        self.answer_weight = float(answer_weight)
        if not variants or any(v not in VARIANTS for v in variants):
            raise ValueError(f"variants must be a non-empty subset of {sorted(VARIANTS)}, got {list(variants)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if min_doc_tokens is not None and not 1 <= min_doc_tokens <= seq_len + 1:
            raise ValueError(f"min_doc_tokens must be in [1, seq_len + 1 = {seq_len + 1}], got {min_doc_tokens}")
        self.tokenizer, self.seq_len, self.seed = tokenizer, int(seq_len), int(seed)
        self.variants, self.rank, self.world_size = tuple(variants), rank, world_size
        if needles is not None and (needles < 1 or min_doc_tokens is not None):
            raise ValueError("needles must be >= 1 and cannot be combined with min_doc_tokens")
        if score not in ("answers", "all"):
            raise ValueError(f"score must be 'answers' or 'all', got {score!r}")
        if min_gap < 0:
            raise ValueError(f"min_gap must be >= 0, got {min_gap}")
        self.min_doc_tokens, self.book = min_doc_tokens, book
        if ask not in ("any", "latest"):
            raise ValueError(f"ask must be 'any' or 'latest', got {ask!r}")
        self.needles, self.min_gap, self.score, self.ask = needles, int(min_gap), score, ask
        if quiet_prefix and needles is None:
            raise ValueError("quiet_prefix needs needles (the dense rows of dense_niah_ids)")
        self.quiet_prefix = int(quiet_prefix)
        self.step = 0
        for v in self.variants:  # build haystacks now, and fail now if a row cannot hold a prompt
            _builder(tokenizer, v, book)
            shortest = min_doc_tokens or seq_len + 1
            if needles is not None:
                dense_niah_ids(tokenizer, seq_len + 1, np.random.default_rng(0), variant=v, needles=needles,
                               book=book, quiet_prefix=self.quiet_prefix)  # fmt: skip
                continue
            niah_token_ids(tokenizer, shortest, np.random.default_rng(0), variant=v, depth=0.5, book=book)

    def _row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        total = self.seq_len + 1
        if self.needles is not None:
            return dense_niah_ids(
                self.tokenizer, total, rng, variant=self.variants[rng.integers(len(self.variants))],
                needles=self.needles, min_gap=self.min_gap, ask=self.ask, book=self.book,
                quiet_prefix=self.quiet_prefix,
            )  # fmt: skip
        lengths = [total]
        if self.min_doc_tokens is not None:
            lengths, left = [], total
            while left:
                n = left if left < 2 * self.min_doc_tokens else int(rng.integers(self.min_doc_tokens, left + 1))
                if left - n < self.min_doc_tokens:  # no room for another document: take the rest
                    n = left
                lengths.append(n)
                left -= n
        docs = [
            niah_token_ids(
                self.tokenizer, n, rng, variant=self.variants[rng.integers(len(self.variants))],
                depth=float(rng.random()), book=self.book,
            )
            for n in lengths
        ]  # fmt: skip
        return np.concatenate([d[0] for d in docs]), np.concatenate([d[1] for d in docs])

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "niah", "seed": self.seed, "seq_len": self.seq_len, "step": self.step,
            "variants": list(self.variants), "min_doc_tokens": self.min_doc_tokens, "book": self.book,
            "needles": self.needles, "min_gap": self.min_gap, "score": self.score, "ask": self.ask,
            "answer_weight": self.answer_weight, "quiet_prefix": self.quiet_prefix,
            "tokenizer": self.tokenizer.to_spec(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {"answer_weight": 1.0, "quiet_prefix": 0, **state}  # saved before these options
        _check_resume("NiahTrainSource", self.state_dict(), state)
        self.step = int(state["step"])


class RecallTrainSource(_RowSource):
    """Keyed-recall training rows (``titans.tasks.recall.recall_row_ids``): each row a haystack of
    ``haystacks`` (drawn per row) with ``needles`` needles and ``questions`` questions, each asking a
    uniformly random earlier needle by its key; ``values`` "numbers", "words" or "mixed" (drawn per
    row). The held-out haystacks (``HELD_OUT_HAYSTACKS``: Milton) and template sets (``"unseen"``)
    are refused: they exist to measure what training never saw. ``score`` and ``answer_weight`` as
    in ``NiahTrainSource``.

    ``episodes`` lists how many independent episodes a row may hold (drawn per row): a row of ``n``
    episodes is ``n`` recall rows of about ``(seq_len + 1) / n`` tokens back to back, each with its own
    haystack, needles and questions, so that one batch trains both short gaps (read back precisely
    soon after writing) and long ones (kept over a long haystack), and the memory learns to carry
    on after an episode it no longer needs. An episode's leading ``eos`` padding sits between
    episodes like a document end and is scored with ``score="all"``.
    """

    def __init__(
        self,
        tokenizer,
        seq_len: int,
        seed: int,
        *,
        haystacks: Sequence[str] = TRAIN_HAYSTACKS,
        needles: int = 8,
        questions: int = 8,
        templates: str = "train",
        values: str = "mixed",
        min_gap: int = 0,
        score: str = "all",
        answer_weight: float = 1.0,
        episodes: Sequence[int] = (1,),
        rank: int = 0,
        world_size: int = 1,
    ):
        haystacks = list(haystacks)
        held = [h for h in haystacks if h in HELD_OUT_HAYSTACKS]
        if held:
            raise ValueError(f"haystack(s) {held} are held out of training (evaluation only); train on {list(TRAIN_HAYSTACKS)}")
        if not haystacks or any(h not in TRAIN_HAYSTACKS for h in haystacks):
            raise ValueError(f"haystacks must be a non-empty subset of {list(TRAIN_HAYSTACKS)}, got {haystacks}")
        if templates in HELD_OUT_TEMPLATES:
            raise ValueError(f"templates {templates!r} are held out of training (evaluation only)")
        if templates not in TEMPLATES:
            raise ValueError(f"templates must be one of {sorted(set(TEMPLATES) - set(HELD_OUT_TEMPLATES))}, got {templates!r}")
        if values not in (*VALUE_KINDS, "mixed"):
            raise ValueError(f"values must be one of {[*VALUE_KINDS, 'mixed']}, got {values!r}")
        if score not in ("answers", "all"):
            raise ValueError(f"score must be 'answers' or 'all', got {score!r}")
        if not (answer_weight >= 1.0 and answer_weight < float("inf")):
            raise ValueError(f"answer_weight must be a finite number >= 1, got {answer_weight}")
        if answer_weight != 1.0 and score != "all":
            raise ValueError("answer_weight needs score='all' (with score='answers' only answers are scored)")
        if isinstance(episodes, (str, bytes)) or not isinstance(episodes, Sequence) or not episodes or any(
            isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in episodes
        ):
            raise ValueError(f"episodes must be a non-empty list of integers >= 1, got {episodes!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.tokenizer, self.seq_len, self.seed = tokenizer, int(seq_len), int(seed)
        self.episodes = tuple(int(n) for n in episodes)
        self.haystacks, self.needles, self.questions = tuple(haystacks), int(needles), int(questions)
        self.templates, self.values, self.min_gap = templates, values, int(min_gap)
        self.score, self.answer_weight = score, float(answer_weight)
        self.rank, self.world_size = rank, world_size
        self.step = 0
        kinds = VALUE_KINDS if values == "mixed" else (values,)
        worst = max(worst_case_tokens(tokenizer, self.needles, self.questions, templates, v) for v in kinds)
        shortest = (self.seq_len + 1) // max(self.episodes)
        if worst > shortest - 16:  # a row must never fail mid-training: refuse a config that could
            what = f"rows of {self.seq_len + 1} tokens" if max(self.episodes) == 1 else f"episodes of {shortest} tokens"
            raise ValueError(f"{what} are too few for {needles} needles and {questions} "
                             f"questions: they may take {worst} tokens, and the haystack needs some room")  # fmt: skip
        for h in self.haystacks:  # build the haystacks now
            self._episode(np.random.default_rng(0), shortest, h)

    def _row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = self.episodes[rng.integers(len(self.episodes))]
        total = self.seq_len + 1
        lengths = [total // n + (total % n if i == 0 else 0) for i in range(n)]
        parts = [self._episode(rng, length) for length in lengths]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _episode(self, rng: np.random.Generator, total: int, haystack_name: str | None = None):
        if haystack_name is None:
            haystack_name = self.haystacks[rng.integers(len(self.haystacks))]
        values = VALUE_KINDS[rng.integers(len(VALUE_KINDS))] if self.values == "mixed" else self.values
        return recall_row_ids(
            self.tokenizer, total, rng, haystack_name=haystack_name, needles=self.needles,
            questions=self.questions, templates=self.templates, values=values, min_gap=self.min_gap,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "recall", "seed": self.seed, "seq_len": self.seq_len, "step": self.step,
            "haystacks": list(self.haystacks), "needles": self.needles, "questions": self.questions,
            "templates": self.templates, "values": self.values, "min_gap": self.min_gap, "score": self.score,
            "answer_weight": self.answer_weight, "episodes": list(self.episodes), "tokenizer": self.tokenizer.to_spec(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {"episodes": [1], **state}  # saved before this option
        _check_resume("RecallTrainSource", self.state_dict(), state)
        self.step = int(state["step"])


def _scored_batch(tokenizer, built, score: str, answer_weight: float) -> dict[str, torch.Tensor]:
    """``{"input_ids", "labels"[, "loss_weights"]}`` of rows ``(ids, answer_mask)``: labels on the
    answers, or (``score="all"``) on every token after the leading ``eos`` padding, answers weighted
    ``answer_weight`` times the others."""
    ids = torch.from_numpy(np.stack([b[0] for b in built]))
    answers = torch.from_numpy(np.stack([b[1] for b in built]))
    mask = answers
    if score == "all":  # everything after the leading eos padding
        mask = (ids != tokenizer.eos_id).cumsum(1) > 0
    batch = {"input_ids": ids, "labels": torch.where(mask, ids, torch.full_like(ids, -100))}
    if answer_weight != 1.0:
        batch["loss_weights"] = 1.0 + (answer_weight - 1.0) * answers.float()
    return batch


class MQARTrainSource:
    """MQAR training rows (``titans.tasks.mqar``): ``seq_len + 1`` tokens, values scored."""

    def __init__(
        self,
        seq_len: int,
        seed: int,
        *,
        vocab_size: int = 8192,
        num_pairs: int = 16,
        power_a: float = 0.01,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        _check_mqar(vocab_size, seq_len + 1, num_pairs, power_a)
        self.seq_len, self.seed = int(seq_len), int(seed)
        self.vocab_size, self.num_pairs, self.power_a = vocab_size, num_pairs, power_a
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def next_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the next global batch: input_ids and labels, [B_local, seq_len + 1]."""
        rows = rank_rows(global_batch_size, self.rank, self.world_size)
        # the whole global batch from one seed (cheap), so every world size sees the same rows
        ids, labels = generate_mqar(
            global_batch_size, vocab_size=self.vocab_size, seq_len=self.seq_len + 1,
            num_pairs=self.num_pairs, power_a=self.power_a, seed=[self.seed, self.step],
        )  # fmt: skip
        self.step += 1
        return {"input_ids": ids[rows].contiguous(), "labels": labels[rows].contiguous()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "mqar", "seed": self.seed, "seq_len": self.seq_len, "step": self.step,
            "vocab_size": self.vocab_size, "num_pairs": self.num_pairs, "power_a": self.power_a,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_resume("MQARTrainSource", self.state_dict(), state)
        self.step = int(state["step"])
