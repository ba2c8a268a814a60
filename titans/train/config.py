"""Run configs: ``model`` (TitansConfig), ``train`` (TrainConfig), ``data`` (DataConfig).

A YAML/TOML file has these three sections; ``--section.key=value`` overrides any field. Unknown
sections or keys are refused with the closest existing name suggested.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..io.config_files import (
    ConfigError,
    apply_overrides,
    check_keys,
    coerce_fields,
    load_config_file,
)
from ..model import TitansConfig
from ..ops.memory.rules import merge_rule

WRITE_PENALTY_FORMS = ("rate", "log_rate")  # what train.write_penalty multiplies (see TrainConfig)


def write_penalty_form_problem(form: str) -> str | None:
    """Why ``form`` is not a write-penalty form, or None."""
    if form in WRITE_PENALTY_FORMS:
        return None
    return f"train.write_penalty_form must be one of {', '.join(map(repr, WRITE_PENALTY_FORMS))}, got {form!r}"

__all__ = ["TrainConfig", "DataConfig", "RunConfig", "load_run_config"]


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    seed: int = 0
    seq_len: int = 512  # tokens predicted per sequence (each row holds seq_len + 1 tokens)
    batch_tokens: int = 8192  # global tokens per optimiser step (paper: 0.5M)
    micro_batch: int = 4  # sequences per forward pass on each rank
    max_steps: int = 1000
    max_minutes: float | None = None  # wall-clock budget: stop (with a checkpoint) when spent
    # end the run at this step (checkpoint written) while the learning-rate schedule stays that of
    # max_steps: a curriculum stage that hands over partway through its schedule
    stop_at_step: int | None = None
    # a fresh run starts from this checkpoint's (or run directory's latest) model weights, with a
    # new optimiser, schedule and data stream: the next stage of a curriculum
    init_from: str | None = None
    # parameters (names matching this regular expression, re.search) that init_from's checkpoint
    # lacks and that keep their initial values: a module added since the checkpoint was trained
    # (e.g. "memory\\.gate_conv\\."); every other missing or unexpected parameter is still refused
    init_new: str | None = None
    # the first detached_prefix tokens of every row stream without gradient; only the state they
    # leave (what the memory wrote) reaches the scored rest of the row: truncated backpropagation,
    # for rows (needle-to-question gaps) longer than the backward pass can hold
    detached_prefix: int = 0
    # train only the parameters whose names match this regular expression (re.search; e.g.
    # "memory\\.to_(theta|eta|alpha)\\." for the memory's gates), the rest frozen: a curriculum stage
    # that must not undo what earlier stages learned
    train_only: str | None = None
    # add write_penalty x the memories' mean write rate (theta / max_lr, over tokens, heads and
    # memory layers; sigmoid theta only) to the loss: writing costs something, so the gates learn to
    # write what the loss needs and little else. A long haystack's writes overwrite a needle only
    # after far more tokens than a training row holds, so the loss alone never asks for that.
    write_penalty: float = 0.0
    # what the penalty multiplies: "rate" (the mean rate) or "log_rate" (the mean log rate). The
    # mean rate's gradient on a token's gate is ~ its rate, so it pushes hardest on the few large
    # writes (the needles) and hardly at all on a haystack already written at 1e-4; the log rate
    # pushes every token's rate down by the same factor, so the loss defends the writes it needs
    # and the haystack's keep falling: what a million tokens of haystack ask for
    write_penalty_form: str = "rate"
    lr: float = 4e-4  # paper section 5.1
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # paper section 5.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU or CUDA)
    eval_every: int = 100  # steps (0: only at the end)
    eval_batches: int = 8
    eval_rows: int = 4  # sequences per evaluation batch (global, the same for any number of ranks)
    log_every: int = 10
    checkpoint_every: int = 100  # steps (0: only at the end / on interruption)
    keep_checkpoints: int = 2
    parallel: str = "none"  # none | ddp | fsdp (under torchrun)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed

    def validate(self) -> None:
        for name in ("seq_len", "batch_tokens", "micro_batch", "max_steps", "eval_batches", "eval_rows", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.max_steps:
            raise ConfigError(f"train.stop_at_step must be in [1, max_steps={self.max_steps}], got {self.stop_at_step}")
        if not 0 <= self.detached_prefix < self.seq_len - 1:
            raise ConfigError(
                f"train.detached_prefix must be in [0, seq_len - 1 = {self.seq_len - 1}) (the scored rest of a "
                f"row needs at least two tokens), got {self.detached_prefix}"
            )
        if self.init_new is not None:
            if self.init_from is None:
                raise ConfigError("train.init_new names parameters that train.init_from's checkpoint lacks: "
                                  "set train.init_from too")  # fmt: skip
            try:
                re.compile(self.init_new)
            except (re.error, TypeError) as err:
                raise ConfigError(f"train.init_new is not a regular expression ({err}): {self.init_new!r}") from None
        if self.train_only is not None:
            try:
                re.compile(self.train_only)
            except re.error as err:
                raise ConfigError(f"train.train_only is not a regular expression ({err}): {self.train_only!r}") from None
        if not (math.isfinite(self.write_penalty) and self.write_penalty >= 0):
            raise ConfigError(f"train.write_penalty must be a finite number >= 0, got {self.write_penalty}")
        problem = write_penalty_form_problem(self.write_penalty_form)
        if problem:
            raise ConfigError(problem)
        if self.batch_tokens % self.seq_len:
            raise ConfigError(
                f"train.batch_tokens ({self.batch_tokens}) must be a multiple of train.seq_len ({self.seq_len})"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.parallel not in ("none", "ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be 'none', 'ddp' or 'fsdp', got {self.parallel!r}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.lr must be a finite number > 0 (got {self.lr}) and train.min_lr_ratio in [0, 1] "
                              f"(got {self.min_lr_ratio})")  # fmt: skip
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ConfigError(f"train.max_minutes must be a finite number of minutes > 0, got {self.max_minutes}")

    def accumulation_steps(self, world_size: int) -> int:
        rows = self.batch_tokens // self.seq_len
        if rows % (self.micro_batch * world_size):
            raise ConfigError(
                f"a step's {rows} sequences (batch_tokens / seq_len) must split evenly into micro batches of "
                f"{self.micro_batch} on each of {world_size} ranks"
            )
        return rows // (self.micro_batch * world_size)


@dataclass
class DataConfig:
    kind: str = "text"  # text (token shards) | niah | recall | mqar (generated on the fly)
    path: str | None = None  # text: a directory from `titans data prepare`; None = the built-in corpus
    tokenizer: str = "bytes"  # bytes | sentencepiece[:PATH] | bpe:VOCAB (text prepared on first use)
    options: dict[str, Any] = field(default_factory=dict)  # generator options (niah / mqar)

    def validate(self) -> None:
        if self.kind not in ("text", "niah", "recall", "mqar"):
            raise ConfigError(f"data.kind must be 'text', 'niah', 'recall' or 'mqar', got {self.kind!r}")


def write_penalty_problem(model: TitansConfig) -> str | None:
    """Why ``train.write_penalty`` cannot apply to ``model`` (None when it can): it prices the
    rate ``theta / max_lr`` of a neural memory's sigmoid learning-rate gate."""
    if model.variant in ("transformer", "swa"):
        return f"train.write_penalty needs a model with a neural memory; a {model.variant} has none"
    if model.memory_theta_activation != "sigmoid":
        return (
            "train.write_penalty needs model.memory_theta_activation=sigmoid (the rate theta / max_lr lies in "
            "(0, 1); softplus theta has no bound to measure it against)"
        )
    return None


@dataclass
class RunConfig:
    model: TitansConfig = field(default_factory=TitansConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": asdict(self.train), "data": asdict(self.data)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        check_keys(d, ("model", "train", "data"), "the config (sections)")
        sections = {}
        for name, klass in (("model", TitansConfig), ("train", TrainConfig), ("data", DataConfig)):
            given = dict(d.get(name) or {})
            if not isinstance(given, dict):
                raise ConfigError(f"config section {name!r} must be a mapping")
            if name == "model" and "memory_rule" in given:  # a named rule: its memory_* settings
                rule = given.pop("memory_rule")
                try:
                    given = merge_rule(rule, coerce_fields(klass, given, name), rename=lambda key: f"memory_{key}")
                except ValueError as err:
                    raise ConfigError(f"model.memory_rule: {err}") from err
            if name == "model" and "preset" in given:
                preset = given.pop("preset")
                check_keys(given, [f.name for f in fields(klass)], "model")
                given = coerce_fields(klass, given, name)
                try:
                    sections[name] = TitansConfig.preset(preset, **given)
                except ValueError as err:
                    raise ConfigError(str(err)) from err
                continue
            check_keys(given, [f.name for f in fields(klass)], name)
            given = coerce_fields(klass, given, name)
            try:
                sections[name] = klass(**given)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"config section {name!r}: {err}") from err
        run = cls(**sections)
        run.train.validate()
        run.data.validate()
        problem = write_penalty_problem(run.model) if run.train.write_penalty > 0 else None
        if problem:
            raise ConfigError(problem)
        return run


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """The run config of a file (or the defaults when ``path`` is None) with overrides applied."""
    base = load_config_file(path) if path else {}
    return RunConfig.from_dict(apply_overrides(base, overrides))
