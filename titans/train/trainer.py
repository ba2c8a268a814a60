"""The training loop, top to bottom.

    run = load_run_config("configs/tiny.yaml", ["train.lr=3e-4"])
    summary = train(run)                     # or train(run, resume="auto")

One optimiser step = ``train.batch_tokens`` tokens (the global batch), split over ranks and into
micro batches of ``train.micro_batch`` sequences whose gradients accumulate. The loss is the mean
over every target token of the global batch, whatever the split, so one process and N processes
with the same global batch follow the same trajectory.
"""

from __future__ import annotations

import copy
import json
import math
import random
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io.config_files import ConfigError
from ..errors import NonFiniteError, UserError, first_line, out_of_memory
from ..model import TitansLM
from ..runtime.cpu import warn_if_cpu_bf16_is_slow
from . import checkpoint as ckpt
from .records import describe_dropped, read_jsonl
from .config import RunConfig, write_penalty_form_problem, write_penalty_problem
from .distributed import (
    World, all_reduce_sum, full_state_dicts, init_distributed, load_full_state_dicts,
    no_gradient_sync, parallelize,
)  # fmt: skip
from .lock import run_lock
from .optim import build_optimizer, build_scheduler
from .sources import as_inputs, build_sources

__all__ = ["train", "resolve_device"]

# fields that may differ between a checkpoint and the run that resumes it
_RESUMABLE_CHANGES = {
    "max_steps", "max_minutes", "eval_every", "eval_batches", "eval_rows", "log_every", "checkpoint_every",
    "keep_checkpoints", "parallel", "device", "progress", "tensorboard", "out_dir", "micro_batch", "stop_at_step",
    "init_from", "init_new",  # only read by a fresh run
}  # fmt: skip


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """``"auto"`` (CUDA when there is one), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; anything else,
    or CUDA where there is none, is a ConfigError naming ``what``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"{what} {name!r} is not a device (cpu, cuda, cuda:N or auto): {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what} {name!r}: only cpu, cuda, cuda:N and auto are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {name!r} but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{what} {name!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _with_defaults(saved: dict, section: str) -> dict:
    """A checkpoint's config section with the settings it lacks (added to the package after it
    was written) at their defaults, which is what the checkpoint ran with."""
    return {**RunConfig().to_dict()[section], **saved.get(section, {})}


def _check_compatible(saved: dict, run: RunConfig, where: str) -> None:
    """Refuse to resume a checkpoint whose model, data or optimisation differ from this run.
    A setting the checkpoint's config lacks counts as its default (``_with_defaults``)."""
    current = run.to_dict()
    diffs = []
    for section in ("model", "data", "train"):
        old, new = _with_defaults(saved, section), current[section]
        for key in sorted(set(old) | set(new)):
            if section == "train" and key in _RESUMABLE_CHANGES:
                continue
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: checkpoint {old.get(key)!r}, this run {new.get(key)!r}")
    if diffs:
        raise ckpt.CheckpointError(f"{where} comes from another config:\n  " + "\n  ".join(diffs))


def _init_from(model: TitansLM, path: str, run: RunConfig, tokenizer, verbose: bool) -> None:
    """Load the weights of checkpoint (or run directory) ``path`` into ``model``. The tokenizer
    must be the same; model settings that do not change the weights (segment, window, chunk,
    gates' bounds, ...) may differ, and the differences are printed."""
    if path.startswith("recipe:"):
        raise ConfigError(
            f"train.init_from {path!r} names a package recipe stage: `titans demo niah --retrain` trains the "
            f"stages in order; with `titans train`, give the earlier stage's run directory or checkpoint"
        )
    # weights and run record only: a training checkpoint, a run directory (its latest) or an
    # exported / shipped one (no optimiser state) all qualify
    where = ckpt.verify_checkpoint(path, required=ckpt.INFERENCE_FILES)
    saved = ckpt.read_run_record(where)
    theirs = saved["tokenizer"] if isinstance(saved["tokenizer"], dict) else {"name": saved["tokenizer"]}
    if theirs != tokenizer.to_spec():
        raise ckpt.CheckpointError(
            f"train.init_from: {where} was trained with another tokenizer "
            f"({theirs.get('name')!r}, this run {tokenizer.to_spec().get('name')!r})"
        )
    fresh = None if run.train.init_new is None else re.compile(run.train.init_new)
    weights = ckpt.read_weights(where / "model.safetensors")
    kept = ckpt.load_model_weights(model, weights, f"train.init_from {where}", keep_initial=fresh,
                                   keep_setting="train.init_new")  # fmt: skip
    old, new = _with_defaults(saved["config"], "model"), run.to_dict()["model"]
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if verbose:
        print(f"initialised from {where} (step {saved.get('step')})"
              + (f"; model settings changed: {', '.join(changed)}" if changed else "")
              + (f"; at their initial values (train.init_new): {', '.join(kept)}" if kept else ""), flush=True)  # fmt: skip


class _Metrics:
    """metrics.jsonl (and TensorBoard when installed) on the main rank."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # resuming: drop what the interrupted run logged after its checkpoint
            records, bad = read_jsonl(self.path)
            if bad:
                print(f"warning: {describe_dropped(self.path, bad)}", file=sys.stderr, flush=True)
            kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _loss_sum(model, input_ids, labels, autocast, weights=None, prefix=0) -> tuple[torch.Tensor, float]:
    """Summed cross-entropy over the targets and their count; with ``weights`` ([B, T], per
    label position, like ``labels``) each target counts its weight in both.

    ``prefix`` > 0 (``train.detached_prefix``): the first ``prefix`` tokens stream through the
    model without gradient and only the state they leave (the memory that read them) enters the
    rest of the row, whose targets alone are scored: backpropagation truncated at ``prefix``, so
    a row can be far longer than what the backward pass holds."""
    state = None
    if prefix:
        with torch.no_grad(), autocast:
            _, _, state = model(input_ids[:, :prefix])
        state = state.detach()
        input_ids, labels = input_ids[:, prefix:], labels[:, prefix:]
        weights = None if weights is None else weights[:, prefix:]
    with autocast:
        logits, _, _ = model(input_ids, state=state)
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    if weights is None:
        return F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum"), int((targets != -100).sum())
    w = weights[:, 1:].reshape(-1).to(flat.dtype) * (targets != -100)
    ce = F.cross_entropy(flat, targets, ignore_index=-100, reduction="none")
    return (ce * w).sum(), float(w.sum())


def _target_weight(labels, weights, prefix=0) -> float:
    """What ``_loss_sum`` counts for a micro batch: its targets, or their summed weights."""
    labels = labels[:, prefix:]
    if weights is None:
        return int((labels[:, 1:] != -100).sum())
    return float((weights[:, prefix + 1 :] * (labels[:, 1:] != -100)).sum())


def _loss_weights(batch, device):
    """A dict batch's optional ``loss_weights`` (NIAH answers weighted above the other tokens)."""
    w = batch.get("loss_weights") if isinstance(batch, dict) else None
    return None if w is None else w.to(device)


@torch.no_grad()
def evaluate(model, eval_batches, device, autocast, prefix: int = 0) -> float:
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for batch in eval_batches():
        input_ids, labels = as_inputs(batch, device)
        loss, n = _loss_sum(model, input_ids, labels, autocast, None, prefix)
        total += loss.double()
        count += n
    model.train(was_training)
    both = all_reduce_sum(torch.stack([total, torch.tensor(float(count), device=device, dtype=torch.float64)]))
    return float(both[0] / both[1]) if both[1] > 0 else float("nan")


class _Interrupt:
    """SIGTERM (a scheduler's kill) is turned into KeyboardInterrupt so both end with a checkpoint."""

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _freeze_all_but(model: TitansLM, pattern: str, verbose: bool) -> None:
    """``train.train_only``: parameters whose names do not match ``pattern`` stop taking gradients."""
    matched = []
    for name, p in model.named_parameters():
        p.requires_grad_(re.search(pattern, name) is not None)
        if p.requires_grad:
            matched.append((name, p.numel()))
    if not matched:
        names = ", ".join(n for n, _ in list(model.named_parameters())[:6])
        raise ConfigError(f"train.train_only {pattern!r} matches no parameter (names look like: {names}, ...)")
    if verbose:
        print(f"training {len(matched)} parameter tensors ({sum(n for _, n in matched):,} values) matching "
              f"{pattern!r}; the rest frozen")


class _WriteRate:
    """``train.write_penalty``: records, while gradients are on, the write rate ``theta / max_lr``
    that every neural memory's gate gives each token and head (its ``to_theta`` output through
    the sigmoid), for the penalty ``write_penalty * mean rate`` (``write_penalty_form: rate``) or
    ``write_penalty * mean log rate`` (``log_rate``). The detached prefix (no gradient) is left
    out: it cannot learn from the penalty."""

    def __init__(self, model: TitansLM, form: str = "rate"):
        from ..layers.neural_memory import NeuralMemory

        problem = write_penalty_problem(model.cfg) or write_penalty_form_problem(form)
        if problem:
            raise ConfigError(problem)
        self.form = form
        memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
        self.sums: list[torch.Tensor] = []
        self.log_sums: list[torch.Tensor] = []
        self.count = 0
        self.hooks = [m.to_theta.register_forward_hook(self._record) for m in memories]

    def _record(self, module, inputs, z: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            if self.form == "log_rate":  # log sigmoid: exact where the rate underflows
                self.log_sums.append(F.logsigmoid(z.float()).sum())
                z = z.detach()  # the rate itself is only reported then: no graph for it
            self.sums.append(torch.sigmoid(z.float()).sum())
            self.count += z.numel()

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(priced, rate)``: the mean the penalty multiplies (the rate or its log) and the mean
        rate, since the last call (None when nothing was recorded); then a fresh start."""
        if not self.count:
            return None
        rate = torch.stack(self.sums).sum() / self.count
        priced = torch.stack(self.log_sums).sum() / self.count if self.form == "log_rate" else rate
        self.sums, self.log_sums, self.count = [], [], 0
        return priced, rate


def train(run: RunConfig, resume: str | None = None, stop_at_step: int | None = None) -> dict:
    """Train ``run``; ``resume`` = None (fresh; refuses an out_dir that has checkpoints),
    'auto' (latest checkpoint of out_dir if any) or a checkpoint path. ``stop_at_step`` ends the
    run early as an interruption would (checkpoint included); tests use it. Returns a summary.

    The first process of a run holds ``out_dir``'s lock (``titans.train.lock``) until it returns:
    a second run pointed at the same directory is refused with the holder's pid."""
    if int(os.environ.get("RANK", "0")) != 0:  # the other processes of a distributed run
        return _train(run, resume, stop_at_step)
    with run_lock(run.train.out_dir):
        return _train(run, resume, stop_at_step)


def _train(run: RunConfig, resume: str | None, stop_at_step: int | None) -> dict:
    cfg, tcfg = run.model, run.train
    if stop_at_step is None:
        stop_at_step = tcfg.stop_at_step
    device = resolve_device(tcfg.device)
    world: World = init_distributed(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if tcfg.precision == "bf16":
        warn_if_cpu_bf16_is_slow(device, "train.precision=bf16", instead="train.precision=fp32 here")
    out_dir = Path(tcfg.out_dir)
    tcfg.accumulation_steps(world.world_size)  # refuses batch sizes that do not split evenly
    rows_global = tcfg.batch_tokens // tcfg.seq_len

    resume_path = None
    if resume == "auto":  # the newest checkpoint that verifies; damaged newer ones are named
        resume_path = ckpt.newest_intact_checkpoint(out_dir, log=print if world.is_main else lambda *_: None)
    elif resume:
        resume_path = Path(resume)
    elif ckpt.latest_checkpoint(out_dir) is not None:
        raise ConfigError(
            f"{out_dir} already has checkpoints: pass --resume auto to continue that run, or choose another "
            f"train.out_dir"
        )

    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    tokenizer, source, eval_batches = build_sources(run, world.rank, world.world_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    model = TitansLM(cfg)
    if tcfg.init_from is not None and resume_path is None:
        _init_from(model, tcfg.init_from, run, tokenizer, world.is_main)
    if tcfg.train_only is not None:
        _freeze_all_but(model, tcfg.train_only, world.is_main)
    write_rate = _WriteRate(model, tcfg.write_penalty_form) if tcfg.write_penalty > 0 else None
    model = model.to(device)
    model = parallelize(model, tcfg.parallel if world.distributed else "none", device)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)

    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    if resume_path is not None:
        state = ckpt.read_checkpoint(resume_path, map_location="cpu")
        _check_compatible(state["run"]["config"], run, str(state["path"]))
        trainer_state = state["trainer"]
        try:
            load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
            scheduler.load_state_dict(trainer_state["scheduler"])
            source.load_state_dict(trainer_state["data"])
            _set_rng_state(trainer_state["rng"])
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
            if out_of_memory(err):
                raise
            raise ckpt.CheckpointError(
                f"{state['path']}: its optimiser or trainer state does not fit this run "
                f"({type(err).__name__}: {first_line(err)})"
            ) from err
        start_step, tokens_seen = trainer_state["step"], trainer_state["tokens"]
        elapsed_before = trainer_state.get("elapsed", 0.0)
        if stop_at_step is not None and start_step > stop_at_step:
            raise ckpt.CheckpointError(
                f"{state['path']} is at step {start_step}, past stop_at_step {stop_at_step}: resume from the "
                f"checkpoint of step {stop_at_step} (or earlier), or raise train.stop_at_step"
            )

    # the data position after the last completed step: an interruption mid-step must not skip
    # the batch it had drawn
    data_state = copy.deepcopy(source.state_dict())
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if tcfg.precision == "bf16" else nullcontext()
    )
    metrics = _Metrics(out_dir, start_step, world.is_main, tcfg.tensorboard)
    run_record = {"config": run.to_dict(), "tokenizer": tokenizer.to_spec()}

    def save(step: int) -> Path | None:
        model_sd, optim_sd = full_state_dicts(model, optimizer)
        path = None
        if world.is_main:
            trainer_state = {
                "step": step, "tokens": tokens_seen, "scheduler": scheduler.state_dict(),
                "data": data_state, "rng": _rng_state(), "elapsed": elapsed_before + time.time() - t0,
            }  # fmt: skip
            path = ckpt.save_checkpoint(
                out_dir, step, model_sd, optim_sd, trainer_state, {**run_record, "step": step}, tcfg.keep_checkpoints
            )
        if world.distributed:
            torch.distributed.barrier()
        return path

    progress = None
    if world.is_main and tcfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=tcfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True)
    t0 = time.time()
    deadline = None if tcfg.max_minutes is None else t0 + 60 * tcfg.max_minutes - elapsed_before
    step, last_loss, val_loss, reason = start_step, float("nan"), None, "max_steps"
    window_t, window_tokens = time.time(), 0
    model.train()
    try:
        with _Interrupt():
            while step < tcfg.max_steps:
                if stop_at_step is not None and step >= stop_at_step:
                    reason = "stopped"
                    break
                if deadline is not None and time.time() >= deadline:
                    reason = "max_minutes"
                    break
                batch = source.next_batch(rows_global)
                micro = [(*as_inputs(b, device), _loss_weights(b, device)) for b in _split_rows(batch, tcfg.micro_batch)]
                local_targets = sum(_target_weight(labels, w, tcfg.detached_prefix) for _, labels, w in micro)
                n_global = float(all_reduce_sum(torch.tensor(float(local_targets), device=device, dtype=torch.float64)))
                if n_global == 0:
                    raise RuntimeError(f"step {step}: the batch has no target tokens (every label is -100)")
                loss_total = torch.zeros((), device=device)
                rates = []
                for i, (input_ids, labels, weights) in enumerate(micro):
                    with no_gradient_sync(model, skip=i < len(micro) - 1):
                        try:
                            loss, _ = _loss_sum(model, input_ids, labels, autocast, weights, tcfg.detached_prefix)
                        except NonFiniteError as err:
                            raise FloatingPointError(
                                f"activations became non-finite in the forward pass of step {step + 1} ({err}); "
                                f"with a memory model this is usually the test-time updates diverging: lower "
                                f"train.lr, or bound the memory's learning rate (model.memory_theta_activation="
                                f"sigmoid, model.memory_max_lr) (last checkpoint: {ckpt.latest_checkpoint(out_dir)})"
                            ) from err
                        # DDP/FSDP average gradients over ranks: scale so the result is the mean over
                        # every target token of the global batch
                        objective = loss * world.world_size / n_global
                        taken = None if write_rate is None else write_rate.take()
                        if taken is not None:  # the mean over micro batches (and, averaged, ranks)
                            priced, rate = taken
                            objective = objective + tcfg.write_penalty * priced / len(micro)
                            rates.append(rate.detach())
                        objective.backward()
                    loss_total += loss.detach()
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                    if tcfg.grad_clip > 0 else None
                )  # fmt: skip
                last_loss = float(all_reduce_sum(loss_total)) / n_global
                if not math.isfinite(last_loss):
                    raise FloatingPointError(
                        f"loss is {last_loss} at step {step + 1}; lower train.lr or check the data "
                        f"(last checkpoint: {ckpt.latest_checkpoint(out_dir)})"
                    )
                norm = None if grad_norm is None else float(
                    grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                )
                if norm is not None and not math.isfinite(norm):
                    # stepping would write NaN into every weight; stop with the weights intact
                    raise FloatingPointError(
                        f"gradient norm is {norm} at step {step + 1} (loss {last_loss:.4f}); lower train.lr "
                        f"(last checkpoint: {ckpt.latest_checkpoint(out_dir)})"
                    )
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                data_state = copy.deepcopy(source.state_dict())
                # tokens read (inputs), whether or not each is a target (generated tasks score few)
                tokens_seen += rows_global * tcfg.seq_len
                window_tokens += rows_global * tcfg.seq_len
                record = {"step": step, "loss": last_loss, "lr": lr, "tokens": tokens_seen, "targets": n_global}
                if norm is not None:
                    record["grad_norm"] = norm
                if rates:  # the mean write rate over the global batch (whichever form the penalty prices)
                    record["write_rate"] = float(all_reduce_sum(torch.stack(rates).mean())) / world.world_size
                if tcfg.eval_every and step % tcfg.eval_every == 0 or step == tcfg.max_steps:
                    val_loss = evaluate(model, eval_batches, device, autocast, tcfg.detached_prefix)
                    record["val_loss"] = val_loss
                if step % tcfg.log_every == 0 or "val_loss" in record:
                    now = time.time()
                    record["tokens_per_s"] = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    metrics.log(record)
                if progress is not None:
                    post = {"loss": f"{last_loss:.3f}", "lr": f"{lr:.2e}"}
                    if "tokens_per_s" in record:
                        post["tok/s"] = f"{record['tokens_per_s']:.0f}"
                    if val_loss is not None:
                        post["val"] = f"{val_loss:.3f}"
                    progress.set_postfix(post, refresh=False)
                    progress.update(1)
                if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < tcfg.max_steps:
                    save(step)
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        if progress is not None:
            progress.close()
    if step > start_step or resume_path is None:
        path = save(step)
    else:
        path = resume_path
    metrics.close()
    summary = {
        "step": step, "tokens": tokens_seen, "loss": last_loss, "val_loss": val_loss, "stopped": reason,
        "checkpoint": str(path) if path else None, "seconds": time.time() - t0,
        "train": asdict(tcfg),
    }  # fmt: skip
    if reason == "interrupted":
        raise KeyboardInterrupt(f"training interrupted at step {step}; checkpoint written to {path}")
    return summary


def _split_rows(batch, micro: int):
    """Micro batches of ``micro`` rows from a tensor or dict batch."""
    if isinstance(batch, dict):
        n = batch["input_ids"].shape[0]
        return [{k: v[i : i + micro] for k, v in batch.items()} for i in range(0, n, micro)]
    return list(batch.split(micro))
