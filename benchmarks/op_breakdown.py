"""Where a training step's time goes, operator by operator, timed at the dispatcher.

``torch.profiler`` on this project's 2-core VM inflated the large elementwise operations of a MAC
training step six- to eightfold (a [2, 4096, 256] multiply listed at 6.6 ms that takes 0.9 ms), so
it pointed at work that costs little. This script times each ATen operator call directly (a
``TorchDispatchMode`` around one training step, wall clock per call) and prints the operators
sorted by total time, with the share of the step each takes and, for the matrix products, the
GFLOP/s they reach. The sum of the per-call times is printed beside the step's own time.

On CPU the dispatcher runs each operator to completion before returning, so per-call wall time
is the operator's time. On CUDA kernels are asynchronous, so the mode synchronises around each
call (the step then runs slower than it would).

    python benchmarks/op_breakdown.py                       # the model_throughput MAC, T=4096
    python benchmarks/op_breakdown.py --variant mag --tokens 1024 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import time


def _matmul_flops(func, args) -> float:
    """FLOPs of mm / bmm / baddbmm / addmm calls (2 per multiply-add), else 0."""
    import torch

    name = str(func)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name.startswith(("aten.mm", "aten.bmm")):
        a, b = tensors[0], tensors[1]
    elif name.startswith(("aten.baddbmm", "aten.addmm")):
        a, b = tensors[1], tensors[2]
    else:
        return 0.0
    return 2.0 * a.numel() * b.shape[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="mac", help="mac, mag, mal, lmm, transformer, swa (default mac)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per row (default 4096)")
    ap.add_argument("--batch", type=int, default=2, help="rows (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-op times are cleanest)")
    ap.add_argument("--top", type=int, default=20, help="operators to list (default 20)")
    args = ap.parse_args()

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from titans.model import TitansConfig, TitansLM
    from titans.utils import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # the model_throughput benchmark's size (dim 256, 2 blocks, 4 heads, segment 128, chunk 64)
    cfg = TitansConfig(variant=args.variant, vocab_size=256, dim=256, depth=2, heads=4, window=128,
                       segment=128, memory_chunk=64, persistent_tokens=4)  # fmt: skip
    model = TitansLM(cfg).to(device)
    ids = torch.randint(0, 256, (args.batch, args.tokens), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids)[1].backward()
        sync()

    step(), step()  # warm-up: allocator, lazy initialisation
    start = time.perf_counter()
    step()
    plain = time.perf_counter() - start

    calls = collections.defaultdict(lambda: [0, 0.0, 0.0])  # name -> [calls, seconds, flops]

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            sync()
            t = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            sync()
            entry = calls[str(func).split(".")[1]]
            entry[0] += 1
            entry[1] += time.perf_counter() - t
            entry[2] += _matmul_flops(func, args)
            return out

    with Timed():
        step()
    total = sum(e[1] for e in calls.values())
    print(f"{args.variant}, B={args.batch}, T={args.tokens}, {args.threads} thread(s), {device}: "
          f"step {plain:.2f} s untimed; operators sum to {total:.2f} s")  # fmt: skip
    print(f"{'operator':32s} {'calls':>7s} {'ms':>9s} {'share':>6s} {'GFLOP/s':>8s}")
    for name, (n, sec, flops) in sorted(calls.items(), key=lambda kv: -kv[1][1])[: args.top]:
        rate = f"{flops / sec / 1e9:8.1f}" if flops else f"{'':8s}"
        print(f"{name:32s} {n:7d} {sec * 1e3:9.1f} {sec / total:6.1%} {rate}")
    gemm = sum(e[1] for e in calls.values() if e[2])
    print(f"matrix products: {gemm / total:.0%} of the operators' time")


if __name__ == "__main__":
    main()
