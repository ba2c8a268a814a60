"""The CPU this process runs on: glibc's allocator tuned for PyTorch, and whether bf16 matrix
products have fast kernels here (and a warning where they do not)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import warnings

import torch

from ..errors import PerformanceWarning

__all__ = ["cpu_bf16_matmul_is_fast", "tune_cpu_allocator", "warn_if_cpu_bf16_is_slow"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process heap instead of returning it to the OS (glibc only).

    PyTorch on CPU allocates through malloc; glibc serves blocks above a threshold (at most
    32 MB) with fresh ``mmap`` pages and unmaps them on free, so every new activation tensor pays
    page faults, which on a small CPU can cost more than the elementwise op that fills it, and more
    per token the longer the sequence (docs/speed.md). Serving every block from the heap and never
    trimming it lets freed blocks be reused (the process keeps its peak resident size, as a GPU
    caching allocator does). It is process-wide, so it is opt-in: the CLI and the benchmarks call
    it; a library user may call it once at start (or preload jemalloc/tcmalloc instead). Returns
    True when applied, False where glibc's ``mallopt`` is not available.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0)  # no mmap-served blocks: everything from the reusable heap
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 40)  # never give the heap top back
    ok &= mallopt(_M_TOP_PAD, 256 * 1024 * 1024)  # grow the heap in large steps
    return bool(ok)


@functools.cache
def _onednn_bf16_hardware() -> bool | None:
    """oneDNN's answer to "does this CPU have bf16 instructions it can use" (AVX-512 core or
    AVX2-VNNI-2 on x86; also answered on ARM); None when this torch cannot ask."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if probe is None or not torch.backends.mkldnn.is_available():
        return None
    return bool(probe())


def cpu_bf16_matmul_is_fast() -> bool | None:
    """Whether PyTorch multiplies bf16 matrices on this CPU through oneDNN (True) or through its
    reference fallback (False), None when it cannot tell. Read at call time, since
    ``torch.backends.mkldnn.enabled`` can change."""
    hardware = _onednn_bf16_hardware()
    return hardware if hardware is None else hardware and torch.backends.mkldnn.enabled


def _outside_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel, for a call made by this module's caller, of the first
    frame outside titans and torch: the user's line, not the library's."""
    titans_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this file is titans/runtime/cpu.py
    inside = (titans_dir + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    frame, level = sys._getframe(2), 2  # level 1 is the function that calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


_warned_bf16: set[str] = set()


def warn_if_cpu_bf16_is_slow(device: torch.device, setting: str, instead: str) -> None:
    """Warn once per ``setting`` when bf16 matrix products would run through PyTorch's reference
    fallback on this CPU (no bf16 instructions oneDNN can use), which is orders of magnitude
    slower than float32 there (measured: docs/speed.md). Only a warning: the setting stays the user's. Silent while torch.compile traces."""
    if (
        device.type != "cpu"
        or setting in _warned_bf16
        or torch.compiler.is_compiling()
        or cpu_bf16_matmul_is_fast() is not False
    ):
        return
    _warned_bf16.add(setting)
    warnings.warn(
        f"{setting}: PyTorch has no fast bf16 matrix kernel on this CPU (oneDNN finds no bf16 "
        f"instructions), so bf16 matrix products run through a slow fallback (a 2048^2 matmul "
        f"~400x slower than float32 on an AVX2-only AMD EPYC); use {instead}",
        PerformanceWarning,
        stacklevel=_outside_stacklevel(),
    )
