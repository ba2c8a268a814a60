"""Small process-level helpers."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .errors import PerformanceWarning

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process heap instead of returning it to the OS (glibc only).

    PyTorch on CPU allocates through malloc; glibc serves blocks above a threshold (at most
    32 MB) with fresh ``mmap`` pages and unmaps them on free, so every new activation tensor pays
    page faults. On the 2-core machine this project is measured on, that made a 1 MB elementwise
    op 6x slower than writing into an existing buffer, and a 16K-token training step of the
    memory layer 1.3x slower per token than a 1K one. Serving every block from the heap and never
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


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MB blocks (shards, checkpoints and archives are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never
    a part: a temporary file in the same directory, flushed to disk, then renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resident_mb() -> float | None:
    """This process's resident memory now (MB), from /proc (Linux); None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakResident:
    """Peak resident memory (MB) over a ``with`` block, sampled every ``interval`` seconds by a
    thread (so a later, smaller phase is not hidden behind an earlier peak, as the process-wide
    ``ru_maxrss`` would). Falls back to ``ru_maxrss`` where /proc is missing."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = resident_mb()
            if now is not None:
                self.peak_mb = max(self.peak_mb, now)

    def __enter__(self) -> "PeakResident":
        import threading

        self._stop = threading.Event()
        self.peak_mb = resident_mb() or 0.0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = resident_mb()
        if now is None:  # no /proc: the process-wide peak is the best available
            import resource

            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        else:
            self.peak_mb = max(self.peak_mb, now)


# ---- inputs of a compiled graph --------------------------------------------------------------
# A compiled graph is specialised on the strides of its inputs (size-1 dims included) and on which
# of them are the same tensor; the one-token decode graphs get inputs in one pattern so that one
# compilation serves a whole stream.


def standard_strides(t: Tensor | None) -> Tensor | None:
    """t with row-major strides (a copy only when it has others): a slice ``ids[:, -1:]`` or a
    prefill's convolution tail is contiguous with another batch stride."""
    if t is None:
        return None
    strides, step = [], 1
    for n in reversed(t.shape):
        strides.append(step)
        step *= n
    return t if t.stride() == tuple(reversed(strides)) else t.clone(memory_format=torch.contiguous_format)


def distinct(ws: tuple[Tensor, ...], others: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``ws`` with a copy in place of every tensor that is one of ``others``."""
    return tuple(w.clone() if any(w is o for o in others) else w for w in ws)


def nonfinite(named: dict[str, Tensor]) -> list[str]:
    """The names of the tensors that hold a NaN or an inf, with one host sync.

    A tensor's sum is finite only if every element is (NaN and inf propagate through a sum, and
    +inf + -inf is NaN), so one sum per tensor clears them all; ``isfinite(t).all()`` took 40x a
    sum's time on a [4, 4096, 4, 64] float32 tensor here (4.8 ms vs 0.11 ms, 2 threads). A sum
    can also overflow from finite elements: only a tensor whose sum is not finite gets the exact
    elementwise check, which tells the two apart."""
    if not named:
        return []
    # complex: both parts; float32 accumulation for 16-bit tensors (a bf16/fp16 total overflows
    # early); float64 stays. No autograd: the sums are a check, not part of any result.
    named = {k: torch.view_as_real(t) if t.is_complex() else t for k, t in named.items()}
    with torch.no_grad():
        sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
                            for t in named.values()])  # fmt: skip
    suspects = [name for name, ok in zip(named, torch.isfinite(sums).tolist()) if not ok]
    return [name for name in suspects if not bool(torch.isfinite(named[name]).all())]


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
    inside = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))
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
