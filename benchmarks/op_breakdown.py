"""Where a training step's (or a decoded token's) time goes, operator by operator, timed at the
dispatcher.

``torch.profiler`` on this project's 2-core VM inflated the large elementwise operations of a MAC
training step six- to eightfold (a [2, 4096, 256] multiply listed at 6.6 ms that takes 0.9 ms), so
it pointed at work that costs little. This script times each ATen operator call directly (a
``TorchDispatchMode`` around one training step, wall clock per call) and prints the operators
sorted by total time, with the share each takes and, for the matrix products, the GFLOP/s they
reach, beside the rate of one large matmul on the same threads (the machine's practical GEMM peak).
The model is ``benchmarks/model_throughput.py``'s (dim 256, 2 blocks, 4 heads, segment 128);
``--variant layer`` times the memory layer alone at ``benchmarks/memory_throughput.py``'s
configuration (dim 256, 4 heads of 64, depth 2, chunk 64; input ``[batch, tokens, 256]``, loss the
mean square of its output).

``--decode N`` reads ``--tokens`` tokens of context and then times N one-token decoding steps
instead; ``--by function`` groups the calls by the innermost ``titans`` function that issued them
(which part of the model spends the calls) instead of by operator; ``--by shape`` by operator and
operand shapes (batch dim dropped; ``T`` marks a transposed operand), which tells the matrix
products apart.

On CPU the dispatcher runs each operator to completion before returning, so per-call wall time
is the operator's time. On CUDA kernels are asynchronous, so the mode synchronises around each
call (the step then runs slower than it would).

    python benchmarks/op_breakdown.py                       # MAC training step, B=2, T=4096
    python benchmarks/op_breakdown.py --variant mag --tokens 1024 --threads 2
    python benchmarks/op_breakdown.py --decode 64 --tokens 1000 --batch 1 --by function
    python benchmarks/op_breakdown.py --variant layer --batch 4 --threads 2 --by shape
    python benchmarks/op_breakdown.py --variant layer --rule omega --by function
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from _measure import gemm_rate, machine_name, matmul_flops, matmul_operands
from model_throughput import VARIANTS, VOCAB, _ours


def _issuer(frame) -> str:
    """``file:function`` of the innermost frame inside the titans package, or ``(outside)``."""
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/titans/" in path:
            return f"{path.rsplit('/titans/', 1)[-1]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "(outside)"


def _shape_key(func, args) -> str:
    """The operator's name, plus its operands' shapes for matrix products (``T``: transposed)."""
    name = str(func).split(".")[1]
    operands = matmul_operands(func, args)
    if operands is None:
        return name

    def describe(t) -> str:
        transposed = t.stride(-2) == 1 and t.stride(-1) != 1
        return f"{tuple(t.shape[-2:])}{'T' if transposed else ''}"

    return f"{name} " + " x ".join(describe(t) for t in operands)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="mac", choices=(*VARIANTS, "layer"),
                    help="model variant, or 'layer': the memory layer alone (default mac)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per row, or context with --decode (default 4096)")
    ap.add_argument("--batch", type=int, default=2, help="rows (default 2)")
    ap.add_argument("--decode", type=int, default=0, metavar="N", help="time N one-token decoding steps instead")
    ap.add_argument("--by", choices=("operator", "function", "shape"), default="operator",
                    help="group calls by (default operator)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-op times are cleanest)")
    ap.add_argument("--top", type=int, default=20, help="rows to list (default 20)")
    ap.add_argument("--rule", default=None, help="--variant layer: a named memory rule (titans.ops.memory.rules)")
    args = ap.parse_args()
    if args.rule is not None and args.variant != "layer":
        ap.error("--rule applies to --variant layer")

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from titans.runtime.cpu import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.variant == "layer":
        if args.decode:
            ap.error("--decode needs a model variant, not 'layer'")
        from memory_throughput import DIM, _build

        forward, model = _build("titans" if args.rule is None else f"rule-{args.rule}", torch.device(device))
        x = torch.randn(args.batch, args.tokens, DIM, device=device)
    else:
        model = _ours(args.variant).to(device)
        ids = torch.randint(0, VOCAB, (args.batch, args.tokens), device=device)

    if args.decode:
        model.eval()
        torch.set_grad_enabled(False)
        _, _, state = model(ids)
        token = ids[:, -1:]

        def run():
            nonlocal state, token
            for _ in range(args.decode):
                logits, _, state = model(token, state=state)
                token = logits[:, -1].argmax(-1, keepdim=True)
            sync()

        what = f"{args.decode} decoded tokens after {args.tokens} of context"
    else:

        def run():
            model.zero_grad(set_to_none=True)
            if args.variant == "layer":
                forward(x).square().mean().backward()
            else:
                model(ids, labels=ids)[1].backward()
            sync()

        what = "one training step"
        run()  # warm-up: allocator, lazy initialisation (decoding warmed up on its context)
    start = time.perf_counter()
    run()
    plain = time.perf_counter() - start

    calls = collections.defaultdict(lambda: [0, 0.0, 0.0])  # key -> [calls, seconds, flops]
    by_function, by_shape = args.by == "function", args.by == "shape"

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            sync()
            t = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            sync()
            if by_function:
                key = _issuer(sys._getframe(1))
            else:
                key = _shape_key(func, args) if by_shape else str(func).split(".")[1]
            entry = calls[key]
            entry[0] += 1
            entry[1] += time.perf_counter() - t
            entry[2] += matmul_flops(func, args)
            return out

    with Timed():
        run()
    total = sum(e[1] for e in calls.values())
    count = sum(e[0] for e in calls.values())
    per = f"; {count / args.decode:.0f} calls, {plain / args.decode * 1e3:.2f} ms a token" if args.decode else ""
    print(f"{args.variant}, {what}, B={args.batch}, {args.threads} thread(s), {device}: {plain:.2f} s "
          f"untimed; operators sum to {total:.2f} s{per}")  # fmt: skip
    rate, n = gemm_rate(device)
    print(f"{machine_name(device)}\na {n}^2 float32 matmul here: {rate:.1f} GFLOP/s")
    width = max(len(k) for k in calls) if calls else 8
    print(f"{args.by:{width}s} {'calls':>7s} {'ms':>9s} {'share':>6s} {'GFLOP/s':>8s}")
    for key, (n, sec, flops) in sorted(calls.items(), key=lambda kv: -kv[1][1])[: args.top]:
        # a rate only for an operator: a function's time also holds its other operators
        rate = f"{flops / sec / 1e9:8.1f}" if flops and not by_function else f"{'':8s}"
        print(f"{key:{width}s} {n:7d} {sec * 1e3:9.1f} {sec / total:6.1%} {rate}")
    if not by_function:
        gemm = sum(e[1] for e in calls.values() if e[2])
        print(f"matrix products: {gemm / total:.0%} of the operators' time")


if __name__ == "__main__":
    main()
