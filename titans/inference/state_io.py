"""Save and load recurrent states (a model's memory of everything it has read) as safetensors +
JSON, so that a model can memorise a document today and continue from it tomorrow.

The JSON holds the structure (which dataclass, which field, ints such as positions); the
safetensors file holds the tensors, each once even where the state refers to it twice (a memory
whose chunk-start weights are its running weights). Only the project's own state classes are
rebuilt on load. Both files are written to temporary names and renamed, so an interrupted save
never leaves a half-written state behind. ``state.json`` records the SHA-256 of the tensors file: a
flipped bit is refused on load, as is a ``state.json`` that records no checksum, a state with no
layers or a negative position, and a ``state.json`` whose structure is not one ``save_state``
writes; given the model, ``load_state`` also refuses a state of another layout (``TitansLM.check_state``) or dtype.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..io.files import sha256_file
from ..ops.tensors import state_tensors

__all__ = ["load_state", "save_state", "state_num_bytes"]

FORMAT = "titans-state/1"


def _state_classes() -> dict[str, type]:
    from ..blocks.common import BlockState
    from ..layers.attention import KVCache
    from ..layers.neural_memory import NeuralMemoryState
    from ..model import ModelState
    from ..ops.memory.state import MemoryState, MemoryWindow

    classes = (ModelState, BlockState, NeuralMemoryState, MemoryState, MemoryWindow, KVCache)
    return {c.__name__: c for c in classes}


def _encode(obj, tensors: dict[str, Tensor], ids: dict[int, str]):
    if isinstance(obj, Tensor):
        key = ids.get(id(obj))
        if key is None:
            key = f"t{len(tensors)}"
            ids[id(obj)] = key
            tensors[key] = obj.detach().clone().contiguous()  # own storage: no shared memory
        return {"tensor": key}
    if is_dataclass(obj):
        classes = _state_classes()
        name = type(obj).__name__
        if classes.get(name) is not type(obj):
            raise TypeError(f"cannot save a {name}: not a titans state class")
        return {"dataclass": name, "fields": {f.name: _encode(getattr(obj, f.name), tensors, ids) for f in fields(obj)}}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_encode(o, tensors, ids) for o in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot save a value of type {type(obj).__name__} in a state")


def _decode(node, tensors: dict[str, Tensor]):
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise ValueError(f"corrupt state file: unexpected node {str(node)[:80]}")
    if "tensor" in node:
        key = node["tensor"]
        if not isinstance(key, str) or key not in tensors:
            raise ValueError(f"corrupt state file: tensor {key!r} is missing from the safetensors file")
        return tensors[key]
    if "dataclass" in node:
        cls = _state_classes().get(node["dataclass"]) if isinstance(node["dataclass"], str) else None
        if cls is None:
            raise ValueError(f"corrupt state file: unknown state class {node['dataclass']!r}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        given = node.get("fields", {})
        if not isinstance(given, dict) or not required <= set(given) <= known:  # fields added later (with defaults) may be absent
            raise ValueError(f"corrupt state file: {cls.__name__} fields {sorted(given)} != {sorted(known)}")
        return cls(**{k: _decode(v, tensors) for k, v in given.items()})
    if "tuple" in node and isinstance(node["tuple"], list):
        return tuple(_decode(n, tensors) for n in node["tuple"])
    if "list" in node and isinstance(node["list"], list):
        return [_decode(n, tensors) for n in node["list"]]
    if "value" in node:
        return node["value"]
    raise ValueError(f"corrupt state file: unexpected node {str(node)[:80]}")


def save_state(state, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``state.safetensors`` and ``state.json`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    tree = _encode(state, tensors, {})
    tmp_t, tmp_j = d / "state.safetensors.tmp", d / "state.json.tmp"
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp_t))
    doc = {"format": FORMAT, "state": tree, "metadata": metadata or {}, "sha256": sha256_file(tmp_t)}
    tmp_j.write_text(json.dumps(doc))
    os.replace(tmp_t, d / "state.safetensors")
    os.replace(tmp_j, d / "state.json")
    return d


def load_state(directory: str | os.PathLike, device: str | torch.device | None = None, model=None):
    """Read a state written by ``save_state``; tensors are moved to ``device`` when given.
    Returns ``(state, metadata)``. Missing or corrupt files raise a ValueError naming the file;
    with ``model`` (a ``TitansLM``), a state it cannot continue (another layout or dtype) is
    refused with both sides named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    jpath, tpath = d / "state.json", d / "state.safetensors"
    for p in (jpath, tpath):
        if not p.is_file():
            raise FileNotFoundError(f"no state file at {p}")
    try:
        doc = json.loads(jpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # a JSONDecodeError is a ValueError
        raise ValueError(f"corrupt state file {jpath}: {type(exc).__name__}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{jpath} is not a titans state (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if "state" not in doc:
        raise ValueError(f"corrupt state file {jpath}: it holds no 'state'")
    if "sha256" not in doc:  # nothing to verify the tensors against: an edited file, or one of a pre-release
        raise ValueError(f"{jpath} records no SHA-256 of {tpath.name}, so its tensors cannot be verified: "
                         f"save the state again with save_state")  # fmt: skip
    if sha256_file(tpath) != doc["sha256"]:
        raise ValueError(f"corrupt state file {tpath}: its SHA-256 differs from the one {jpath.name} records")
    try:
        tensors = load_file(str(tpath), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"corrupt state file {tpath}: {exc}") from exc
    try:
        state = _decode(doc["state"], tensors)
    except RecursionError:
        raise ValueError(f"corrupt state file {jpath}: its structure nests deeper than any state") from None
    except TypeError as exc:  # a field of the wrong kind for its state class
        raise ValueError(f"corrupt state file {jpath}: {exc}") from None
    _check_loaded(state, jpath, model)
    return state, doc.get("metadata", {})


def _check_loaded(state, where: Path, model) -> None:
    from ..model import ModelState

    if isinstance(state, ModelState):
        if not isinstance(state.layers, list):
            raise ValueError(f"{where}: the state's layers must be a list, got {type(state.layers).__name__}")
        if not state.layers:
            raise ValueError(f"{where}: the state has no layers")
        if not isinstance(state.position, int) or isinstance(state.position, bool) or state.position < 0:
            raise ValueError(f"{where}: state position must be an integer >= 0, got {state.position!r}")
    if model is None:
        return
    model.check_state(state)
    dtype = next(model.parameters()).dtype
    floats = {t.dtype for t in state_tensors(state) if t.is_floating_point()}
    # a 32- or 16-bit model's state mixes float32 (the memory), its own dtype and an autocast
    # dtype; a float64 model's is float64 only: a file's state is refused for either mix
    if (dtype == torch.float64) != (floats <= {torch.float64}) and floats:
        raise ValueError(f"{where}: the state holds {sorted(map(str, floats))} tensors, the model computes in {dtype}")


def state_num_bytes(state) -> int:
    """Bytes held by the tensors of a state (each tensor counted once)."""
    unique = {id(t): t for t in state_tensors(state)}
    return sum(t.numel() * t.element_size() for t in unique.values())
