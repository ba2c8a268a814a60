"""Checkpoints: written atomically, verified on load, resumed exactly.

A checkpoint is a directory ``<out_dir>/checkpoints/step-0000100/`` holding

    model.safetensors      the full (unsharded) model weights
    optimizer.safetensors  the full optimiser state, keyed by parameter name
    trainer.safetensors    step, scheduler, RNG states (torch, CUDA, Python, NumPy), data position
    run.json               the run config and the tokenizer spec
    MANIFEST.json          size and SHA-256 of each file above, written last

Nothing is pickled: the optimiser and trainer state are tensors plus JSON (``titans.train.tree_io``),
so loading a checkpoint someone else made cannot run code. Checkpoints of earlier versions, whose
``optimizer.pt`` / ``trainer.pt`` were pickles, are refused for resuming (their weights still serve
``train.init_from`` and inference).

It is assembled in a hidden temporary directory and renamed into place, so a crash mid-write never
leaves a directory that looks complete. ``<out_dir>/checkpoints/LATEST`` names the newest one (also
replaced atomically). Loading checks the manifest first: a truncated or altered file is refused with
a ``CheckpointError`` that names it; a manifest entry that is not a plain file name of the directory
(``../x``, an absolute path), or a file of it that is a link to one outside it, is refused, as is a
``run.json`` / ``MANIFEST.json`` that is not JSON text or not the record a load needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from ..errors import UserError, first_line
from ..io.config_files import ConfigError
from ..io.files import printable, sha256_file, write_text_atomic
from .tree_io import TreeError, load_tree, save_tree

__all__ = [
    "CheckpointError", "save_checkpoint", "verify_checkpoint", "read_checkpoint", "latest_checkpoint",
    "list_checkpoints", "load_pretrained", "export_for_inference", "save_for_inference", "read_weights",
    "newest_intact_checkpoint",
]  # fmt: skip

FILES = ("model.safetensors", "optimizer.safetensors", "trainer.safetensors", "run.json")
_PICKLED = ("optimizer.pt", "trainer.pt")  # what checkpoints of earlier versions held instead


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupted or from another config."""




def read_json(path: Path, where: str) -> Any:
    """The JSON in ``path``; text that is not UTF-8 JSON (or nests, or spells a number, beyond what
    the parser takes) is refused as a ``CheckpointError`` naming ``where`` and the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{where}: {path.name} is corrupted ({type(err).__name__}: {first_line(err)})") from None


def read_run_record(path: Path) -> dict[str, Any]:
    """``run.json`` of checkpoint directory ``path``, checked for what loads read from it: a table
    whose ``config`` holds a ``model`` table (and ``data`` / ``train`` tables if any) and whose
    ``tokenizer`` is a spec."""
    run = read_json(path / "run.json", f"checkpoint {path}")
    config = run.get("config") if isinstance(run, dict) else None
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("model"), dict)
        or not all(isinstance(config.get(k, {}), dict) for k in ("data", "train"))
        or not isinstance(run.get("tokenizer"), (dict, str))
    ):
        raise CheckpointError(f"checkpoint {path}: run.json is not a run record (a table with config.model and "
                              f"a tokenizer spec)")  # fmt: skip
    return run


def check_trainer_state(state: Any, path: Path) -> None:
    """Refuse a trainer state that lacks what a resume restores, or counts steps below zero."""
    keys = ("step", "tokens", "scheduler", "data", "rng")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise CheckpointError(f"checkpoint {path}: trainer.safetensors lacks {', '.join(keys)}")
    for key in ("step", "tokens"):
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"checkpoint {path}: trainer.safetensors has {key} {value!r} (an integer >= 0)")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    run: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a checkpoint (call on one rank only) and prune all but the newest ``keep``."""
    from safetensors.torch import save_file

    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        # safetensors refuses tensors that share memory (tied embeddings): store each name once
        # as its own contiguous copy; loading ties them again through the model.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"step": str(step)})
        save_tree(optimizer_state, tmp / "optimizer.safetensors")
        save_tree(trainer_state, tmp / "trainer.safetensors")
        (tmp / "run.json").write_text(json.dumps(run, indent=1, sort_keys=True))

    final = _assemble(root / f"step-{step:07d}", write, FILES, step)
    write_text_atomic(root / "LATEST", final.name + "\n")
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint named by LATEST (or the highest step if LATEST is missing); None if none."""
    root = checkpoint_root(out_dir)
    pointer = root / "LATEST"
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        path = root / name
        if name.startswith("step-") and "/" not in name and path.is_dir():  # an empty or odd LATEST is ignored
            return path
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def newest_intact_checkpoint(out_dir: str | Path, log=print) -> Path | None:
    """The newest checkpoint of ``out_dir`` that verifies (``verify_checkpoint``), saying which
    newer ones were skipped as damaged; None if there is none at all. Raises if every one is damaged."""
    found = list_checkpoints(out_dir)
    latest = latest_checkpoint(out_dir)
    order = sorted(found, key=lambda p: (p == latest, p.name), reverse=True)
    problems, damaged = [], []
    for path in order:
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            damaged.append(path)
            continue
        for bad in damaged:  # set aside (kept for inspection), so pruning never keeps them over new ones
            bad.rename(bad.with_name(f".damaged-{bad.name}"))
        if problems:
            log(f"resuming from {path.name}: newer checkpoint(s) are damaged and were set aside as "
                f"{', '.join('.damaged-' + p.name for p in damaged)} ({'; '.join(problems)})")  # fmt: skip
        return path
    if problems:
        raise CheckpointError(f"no intact checkpoint in {checkpoint_root(out_dir)}: {'; '.join(problems)}")
    return None


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if (path / "checkpoints").is_dir():  # a run directory: take its latest checkpoint
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run directory {path} has no checkpoints")
        return latest
    return path


INFERENCE_FILES = ("model.safetensors", "run.json")


def verify_checkpoint(path: str | Path, required: tuple[str, ...] = FILES) -> Path:
    """Check that the ``required`` files are there and every file the manifest lists matches it;
    return the checkpoint directory. Inference needs only ``INFERENCE_FILES`` (an exported
    checkpoint has no optimiser state)."""
    path = _resolve(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    manifest_path = path / "MANIFEST.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: MANIFEST.json is missing")
    _inside(path, "MANIFEST.json")
    manifest = read_json(manifest_path, f"checkpoint {path}")
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {path}: MANIFEST.json is not a table of files")
    listed = [name for name, entry in manifest.items() if isinstance(entry, dict)]
    for name in listed:
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"checkpoint {path}: MANIFEST.json lists {name!r}, which is not a file of the "
                                  f"checkpoint directory")  # fmt: skip
    if required == FILES and any(n in listed for n in _PICKLED) and "optimizer.safetensors" not in listed:
        raise CheckpointError(
            f"checkpoint {path} was written by an earlier titans: its optimizer.pt / trainer.pt are pickles, which "
            f"this version never loads (a pickle can run code). Start a new run from its weights with "
            f"train.init_from={path}"
        )
    for name in required:
        if name not in listed:
            raise CheckpointError(f"checkpoint {path}: {name} is missing (the manifest does not list it)")
    for name in listed:
        file = path / name
        entry = manifest.get(name)
        _inside(path, name)
        if entry is None or not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"checkpoint {path}: MANIFEST.json's entry for {name} has no size and SHA-256")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} is truncated or altered ({size} bytes, manifest says {entry['bytes']})"
            )
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupted (SHA-256 differs from the manifest)")
    return path


def _inside(path: Path, name: str) -> None:
    """Refuse a file of checkpoint ``path`` that is a link to anything but an ordinary file (a
    device, a pipe, a directory): a link to a file, as in a download cache, reads bytes whose
    SHA-256 the manifest checks like any other."""
    file = path / name
    if file.is_symlink() and not file.resolve().is_file():
        raise CheckpointError(f"checkpoint {path}: {name} is a link to {printable(os.readlink(file))}, which is not an "
                              f"ordinary file")  # fmt: skip


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and read a checkpoint: {'path', 'run', 'model', 'optimizer', 'trainer'}."""
    path = verify_checkpoint(path)
    run = read_run_record(path)
    try:
        state = {
            "path": path,
            "run": run,
            "model": {k: v.to(map_location) for k, v in read_weights(path / "model.safetensors").items()},
            "optimizer": load_tree(path / "optimizer.safetensors", device=map_location),
            "trainer": load_tree(path / "trainer.safetensors"),
        }
    except TreeError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from err
    check_trainer_state(state["trainer"], path)
    return state


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``model.safetensors`` file; a file that is not safetensors is refused by
    name (safetensors parses a header and raw tensor bytes: nothing in it can run code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a safetensors weights file ({err})") from err


def load_model_weights(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str, keep_initial: re.Pattern | None = None,
    keep_setting: str = "keep_initial",
) -> list[str]:
    """Load ``weights`` into ``model``, every parameter and buffer of it, of its shapes. The
    parameters missing from ``weights`` whose names ``keep_initial`` matches (re.search) keep the
    model's own values (a module added since the weights were saved); their names are returned,
    and a pattern that matches none is refused as a ConfigError naming ``keep_setting``."""
    own = model.state_dict()
    if _tied(model) and "head.weight" not in weights and "embed.weight" in weights:
        weights = {**weights, "head.weight": weights["embed.weight"]}  # exported without the tied copy
    kept = [] if keep_initial is None else sorted(n for n in set(own) - set(weights) if keep_initial.search(n))
    if keep_initial is not None and not kept:
        raise ConfigError(f"{keep_setting} {keep_initial.pattern!r} matches no parameter that {where} lacks")
    weights = {**weights, **{name: own[name] for name in kept}}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        hint = ""
        if missing and not unexpected and all(".persistent." in name for name in missing):
            hint = (" (weights saved without persistent tokens, e.g. an LMM from before the LMM read them: "
                    "set model.persistent_tokens: 0)")  # fmt: skip
        raise CheckpointError(
            f"{where} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}{hint}"
        )
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, the model has {tuple(own[name].shape)}"
            )
    model.load_state_dict(weights)
    return kept


def load_pretrained(
    path: str | Path, map_location: str | torch.device = "cpu", model_settings: dict[str, Any] | None = None
):
    """A trained model for inference: ``(model in eval mode, tokenizer, info)``.

    ``path`` is a checkpoint directory or a run directory (its latest checkpoint). ``info`` holds
    the run config, the step and the checkpoint path. ``model_settings``: model config fields to
    run with instead of the checkpoint's (test-time settings such as ``memory_max_grad_norm`` or
    ``memory_chunk``; one that changes a weight's shape is refused when the weights load), recorded
    in ``info["model_settings"]`` as ``{field: {"trained": old, "inference": new}}``.
    """
    from ..data.tokenizers import load_tokenizer
    from ..model import TitansConfig, TitansLM

    path = verify_checkpoint(path, required=INFERENCE_FILES)
    run = read_run_record(path)
    changed = apply_model_settings(run["config"], model_settings) if model_settings else None
    weights = read_weights(path / "model.safetensors")
    model_config = run["config"]["model"]
    if model_config.get("variant") == "lmm" and not any(".persistent." in name for name in weights):
        # saved before the LMM read persistent tokens: that model had none, whatever the field said
        model_config = run["config"]["model"] = {**model_config, "persistent_tokens": 0}
    try:
        cfg = TitansConfig.from_dict(model_config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: run.json's model config cannot be used ({first_line(err)})") from err
    model = TitansLM(cfg)
    try:
        load_model_weights(model, weights, str(path))
    except CheckpointError as err:
        if not changed:
            raise
        raise CheckpointError(f"model settings {model_settings} do not fit the checkpoint's weights: {err}") from err
    model.to(map_location).eval()
    try:
        tokenizer = load_tokenizer(run["tokenizer"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: run.json's tokenizer cannot be loaded ({first_line(err)})") from err
    info = {"path": str(path), "step": run.get("step"), "config": run["config"]}
    if changed:
        info["model_settings"] = changed
    return model, tokenizer, info


def _assemble(dst: Path, write, files: tuple[str, ...], step) -> Path:
    """Build a checkpoint directory aside (``write(tmp)`` creates ``files``), add the manifest of
    their sizes and SHA-256, flush everything to disk, then rename it over ``dst``: a crash at any
    point leaves either the old directory or the complete new one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    try:
        write(tmp)
        manifest = {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in files}
        manifest["step"] = step
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        write_text_atomic(tmp / "MANIFEST.json", json.dumps(manifest, indent=1))
        if dst.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_inference_dir(dst: Path, write_weights, run: dict[str, Any]) -> Path:
    def write(tmp: Path) -> None:
        write_weights(tmp / "model.safetensors")
        (tmp / "run.json").write_text(json.dumps(run, indent=1, sort_keys=True))

    return _assemble(dst, write, INFERENCE_FILES, run.get("step"))


def export_for_inference(
    src: str | Path, dst: str | Path, note: dict[str, Any] | None = None, model_settings: dict[str, Any] | None = None
) -> Path:
    """Copy a checkpoint's weights and run record (no optimiser or trainer state) into ``dst``,
    verified, with a manifest; ``note`` (e.g. the command that produced it) goes into run.json.
    ``model_settings``: model config fields the exported checkpoint runs with instead of the
    trained ones (test-time settings that keep every weight's shape, e.g. the memory's
    ``memory_max_grad_norm``); both values are recorded in ``provenance.inference_settings``.
    The directory is assembled aside and renamed into place."""
    from safetensors.torch import save_file

    src = verify_checkpoint(src)
    run = read_run_record(src)
    if note or model_settings:
        run["provenance"] = dict(note or {})
    if model_settings:
        run["provenance"]["inference_settings"] = apply_model_settings(run["config"], model_settings)
    weights = read_weights(src / "model.safetensors")
    if (
        run["config"]["model"].get("tie_embeddings", True)
        and "head.weight" in weights
        and torch.equal(weights["head.weight"], weights.get("embed.weight", torch.empty(0)))
    ):
        del weights["head.weight"]  # the tied output head is the embedding: stored once
    return _write_inference_dir(Path(dst), lambda p: save_file(weights, p), run)


def apply_model_settings(config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Set ``settings`` in a run record's model config (in place), validated as a ``TitansConfig``;
    returns ``{field: {"trained": old, "inference": new}}``. A setting that would change a weight's
    shape fails when the weights are loaded, so only test-time settings make sense here."""
    from ..model import TitansConfig

    record = {k: {"trained": config["model"].get(k), "inference": v} for k, v in settings.items()}
    config["model"].update(settings)
    try:
        TitansConfig.from_dict(config["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"model settings {settings}: {err}") from err
    return record


def _tied(model: torch.nn.Module) -> bool:
    head, embed = getattr(model, "head", None), getattr(model, "embed", None)
    return head is not None and embed is not None and head.weight is embed.weight


def save_for_inference(model, tokenizer, dst: str | Path, note: dict[str, Any] | None = None, step: int = 0) -> Path:
    """Write a model (a ``TitansLM``) and its tokenizer as a checkpoint ``load_pretrained`` reads."""
    from safetensors.torch import save_file

    from .config import RunConfig

    run = {"config": RunConfig(model=model.cfg).to_dict(), "tokenizer": tokenizer.to_spec(), "step": step}
    if note:
        run["provenance"] = note
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return _write_inference_dir(Path(dst), lambda p: save_file(tensors, p), run)
