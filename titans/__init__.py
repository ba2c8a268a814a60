"""Titans: learning to memorize at test time (Behrouz, Zhong, Mirrokni). The neural long-term memory
(``titans.layers.NeuralMemory``, ``titans.ops.memory``), the MAC / MAG / MAL / LMM models and their
baselines (``titans.model``), training, evaluation and the demos; see docs/README.md."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("titans-ltm")  # the distribution's name; the version lives in pyproject.toml only
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"
