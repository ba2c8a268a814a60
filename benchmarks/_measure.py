"""Measurement helpers shared by the benchmark scripts (peak memory on CPU and CUDA)."""

from __future__ import annotations

import contextlib


def rss_bytes(field: str = "VmRSS") -> int:
    """The process's resident set (or another /proc/self/status field) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


class _Peak:
    value = 0


@contextlib.contextmanager
def peak_tracker():
    """Peak memory of the block above what was resident when it started: on CUDA the allocator's
    peak; on CPU the rise of the resident high-water mark (VmHWM, reset on entry)."""
    import torch

    peak = _Peak()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield peak
        torch.cuda.synchronize()
        peak.value = torch.cuda.max_memory_allocated() - base
        return
    base = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")
    yield peak
    peak.value = rss_bytes("VmHWM") - base
