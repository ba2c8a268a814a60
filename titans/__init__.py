"""Titans: learning to memorize at test time (Behrouz, Zhong, Mirrokni). The neural long-term memory
(``titans.layers.NeuralMemory``, ``titans.ops.memory``), the MAC / MAG / MAL / LMM models and their
baselines (``titans.model``), decoding and saved states (``titans.inference``), training,
evaluation and the demos; see docs/README.md."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("titans-ltm")  # the distribution's name; the version lives in pyproject.toml only
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

# Imported on first use, so that `import titans` (and `titans --help`) does not load torch.
_EXPORTS = {"save_state": "titans.inference.state_io", "load_state": "titans.inference.state_io"}

__all__ = ["__version__", "load_state", "save_state"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
