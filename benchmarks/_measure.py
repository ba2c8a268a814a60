"""Measurement helpers shared by the benchmark scripts (peak memory on CPU and CUDA)."""

from __future__ import annotations

import contextlib
import platform


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


def gemm_rate(device: str = "cpu", dtype=None) -> tuple[float, int]:
    """``(GFLOP/s, n)``: the rate of an n x n matmul (float32 unless ``dtype``) on the current
    threads, n = 2048: the rate matrix products can practically reach on this machine. A 512^2
    product is timed first; where it shows that a 2048^2 one would take more than 5 s (bf16
    through torch's reference fallback: ~100 s a product on an AVX2-only AMD EPYC), the 512^2
    rate is returned, with n = 512, instead."""
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
        return small, 512
    return rate(2048, 5)[0], 2048


def machine_name(device: str = "cpu") -> str:
    """What the numbers were measured on: the CUDA device's name, else the CPU model with its
    family and model numbers (a Zen 1 and a Zen 4 EPYC both call themselves "AMD EPYC" in a VM),
    the vector instructions torch uses, whether torch has a fast bf16 matmul here, and the torch
    threads. Tables from different machines are not comparable (docs/speed.md)."""
    import torch

    from titans.runtime.cpu import cpu_bf16_matmul_is_fast

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        model += f" (family {info['cpu family']}, model {info['model']})"
    bf16 = {True: "yes", False: "no", None: "unknown"}[cpu_bf16_matmul_is_fast()]
    return (f"{model}; {torch.backends.cpu.get_cpu_capability()}; fast bf16 matmul: {bf16}; "
            f"{torch.get_num_threads()} torch threads")
