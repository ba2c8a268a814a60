"""Resident memory of this process, now and at its peak over a block (benchmarks, the demo)."""

from __future__ import annotations

import os

__all__ = ["PeakResident", "resident_mb"]


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
