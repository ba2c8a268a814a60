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


def matmul_operands(func, args):
    """``(a, b)`` of an mm / bmm / addmm / baddbmm call (``func`` an ATen overload as a dispatch
    mode sees it; the add forms' first tensor is the accumulator), else None."""
    import torch

    name = str(func).split(".")[1] if str(func).startswith("aten.") else ""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("mm", "bmm"):
        return tensors[0], tensors[1]
    if name in ("addmm", "addmm_", "baddbmm", "baddbmm_"):
        return tensors[1], tensors[2]
    return None


def matmul_flops(func, args) -> float:
    """FLOPs of one matrix-product call (2 per multiply-add; see ``matmul_operands``), else 0."""
    operands = matmul_operands(func, args)
    return 0.0 if operands is None else 2.0 * operands[0].numel() * operands[1].shape[-1]


def count_matmul_flops(fn) -> float:
    """Matrix-product FLOPs of one call of ``fn()``, counted at the dispatcher: the mm / bmm /
    addmm / baddbmm calls that reach ATen (einsum, linear and their backward lower to these);
    matrix-vector and dot products (mv, addmv, dot, addbmm) are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    total = [0.0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            total[0] += matmul_flops(func, args)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return total[0]


def gemm_rate(device: str = "cpu", dtype=None) -> float:
    """GFLOP/s of a 2048 x 2048 matmul (float32 unless ``dtype``) on the current threads: the
    rate matrix products can practically reach on this machine. A 512^2 product is timed first;
    where it shows that the 2048^2 ones would take minutes (bf16 on a CPU without bf16 hardware:
    0.17 GFLOP/s, 100 s a product), its own rate is returned instead."""
    import time

    import torch

    dtype = dtype or torch.float32
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def rate(n: int, reps: int) -> tuple[float, float]:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b, sync()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        seconds = (time.perf_counter() - start) / reps
        return 2 * n**3 / seconds / 1e9, seconds

    small, seconds = rate(512, 3)
    if seconds * 64 > 5.0:  # a 2048^2 product is 64x the work of a 512^2 one
        return small
    return rate(2048, 5)[0]


def machine_name(device: str = "cpu") -> str:
    """What the numbers were measured on: the CUDA device's name, else the CPU model and the
    threads torch uses. Tables from different machines are not comparable: a 2048^2 matmul has run
    at 68-71 GFLOP/s on an AMD EPYC (Zen 1) and at 174-192 on another 2-core machine here."""
    import platform

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads"
