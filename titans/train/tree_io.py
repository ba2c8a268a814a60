"""Nested state (optimiser, scheduler, RNG, data position, configs) in a safetensors file: nothing in
it can run code when it is loaded.

``save_tree(tree, path)`` stores every tensor (and NumPy array) of ``tree`` as a safetensors tensor
and the structure around them (dicts, lists, tuples, numbers, strings, booleans, None) as JSON in
the file's metadata; ``load_tree(path)`` rebuilds it. This replaces ``torch.save`` / pickle, which
executes whatever a file tells it to: a checkpoint received from someone else can only be wrong,
never hostile. Any other object type is refused when saving, by its path in the tree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["TreeError", "load_tree", "save_tree"]

_META_KEY = "titans.tree"
_FORMAT = 1


class TreeError(ValueError):
    """A tree that cannot be stored, or a file that is not a stored tree."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else {"float": repr(value)}  # JSON has no nan / inf
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        # safetensors' torch side lacks some NumPy dtypes (uint32): store int64 and the dtype's name
        wide = obj.astype(np.int64) if obj.dtype.kind in "iu" else obj
        tensors[key] = torch.from_numpy(np.ascontiguousarray(wide)).clone()
        return {"ndarray": key, "dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TreeError(f"{where}: dict key {k!r} of type {type(k).__name__} cannot be stored (str or int only)")
            items.append([k, _encode(v, tensors, f"{where}[{k!r}]")])
        return {"items": items}
    raise TreeError(f"{where}: a {type(obj).__name__} cannot be stored (tensors, arrays, numbers, strings, "
                    f"None and dicts / lists / tuples of them only)")  # fmt: skip


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, dict) and len(node) in (1, 2):
        (tag, value), *rest = node.items()
        if tag == "tensor" and not rest:
            return _tensor(tensors, value, where)
        if tag == "ndarray" and rest and rest[0][0] == "dtype":
            return _tensor(tensors, value, where).numpy().astype(np.dtype(rest[0][1]))
        if tag == "float" and value in ("nan", "inf", "-inf") and not rest:
            return float(value)
        if tag == "tuple" and isinstance(value, list) and not rest:
            return tuple(_decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value))
        if tag == "dict" and isinstance(value, dict) and not rest:
            return {k: _decode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        if tag == "items" and isinstance(value, list) and not rest:
            if not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int)) for kv in value):
                raise TreeError(f"{where}: malformed dict items")
            return {k: _decode(v, tensors, f"{where}[{k!r}]") for k, v in value}
    raise TreeError(f"{where}: not a stored value: {str(node)[:80]}")


def _tensor(tensors: dict[str, torch.Tensor], key: Any, where: str) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise TreeError(f"{where}: names tensor {key!r}, which the file does not hold")
    return tensors[key]


def save_tree(tree: Any, path: str | Path) -> None:
    """Write ``tree`` to the safetensors file ``path`` (tensors as tensors, the rest as JSON)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, "state")
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps({"format": _FORMAT, "tree": skeleton})})


def load_tree(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Read a tree written by ``save_tree``; ``TreeError`` names what is wrong with a file that is
    not one (never runs code: safetensors and JSON only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise TreeError(f"{path} is not a safetensors file ({err})") from err
    if _META_KEY not in meta:
        raise TreeError(f"{path} holds no stored state (no {_META_KEY!r} metadata)")
    try:
        record = json.loads(meta[_META_KEY])
    except (json.JSONDecodeError, RecursionError) as err:
        raise TreeError(f"{path}: the stored structure is not valid JSON ({err})") from err
    if not isinstance(record, dict) or record.get("format") != _FORMAT or "tree" not in record:
        raise TreeError(f"{path}: unknown state format {record.get('format') if isinstance(record, dict) else record!r}")
    try:
        return _decode(record["tree"], tensors, "state")
    except TreeError:
        raise
    except (TypeError, ValueError, KeyError, RecursionError) as err:  # hostile or damaged metadata
        raise TreeError(f"{path}: the stored structure is malformed ({type(err).__name__}: {err})") from None
