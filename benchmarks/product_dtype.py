"""The memory layer with bf16 chunk products (``product_dtype="bfloat16"``) against float32.

Two tables:

- speed: forward+backward tokens/s of ``NeuralMemory`` (B=4, dim 256, 4 heads of 64, depth 2,
  chunk 64) with float32 and bf16 products, eager and compiled, timed in interleaved rounds in one
  process (this machine is noisy: rounds side by side compare better than separate runs);
- error: how far the bf16 path's final memory state and outputs are from the float32 path's as the
  stream grows (relative RMS; chunk 16, slow forgetting), the numbers quoted in
  titans/ops/memory/README.md.

    python benchmarks/product_dtype.py                     # both tables
    python benchmarks/product_dtype.py --skip-error --threads 2 --length 4096
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def speed(T: int, rounds: int, compiled: bool) -> None:
    from titans.layers import NeuralMemory
    from titans.runtime.cpu import tune_cpu_allocator

    tune_cpu_allocator()
    # max_grad_norm=None: the paper's update, as memory_throughput.py measures it
    base = NeuralMemory(256, heads=4, head_dim=64, depth=2, expansion=4.0, chunk_size=64, max_grad_norm=None)
    settings = [("float32", None, False), ("bf16", "bfloat16", False)]
    if compiled:
        settings += [("float32 compiled", None, True), ("bf16 compiled", "bfloat16", True)]
    layers = {}
    for name, product_dtype, compile in settings:
        layers[name] = NeuralMemory(256, heads=4, head_dim=64, depth=2, expansion=4.0, chunk_size=64,
                                    product_dtype=product_dtype, compile=compile, max_grad_norm=None)  # fmt: skip
        layers[name].load_state_dict(base.state_dict())
    x = torch.randn(4, T, 256, requires_grad=True)

    def step(layer):
        y, _ = layer(x)
        y.square().mean().backward()

    for layer in layers.values():  # warm-up (and compile)
        step(layer), step(layer)
    rates = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            start = time.perf_counter()
            step(layer)
            rates[name].append(4 * T / (time.perf_counter() - start))
    print(f"NeuralMemory fwd+bwd, B=4, T={T}, dim 256, 4x64, depth 2, chunk 64, "
          f"{torch.get_num_threads()} threads; tok/s per round")  # fmt: skip
    for name, r in rates.items():
        print(f"  {name:<17} " + " / ".join(f"{v:,.0f}" for v in r))


def error(lengths: list[int]) -> None:
    from _helpers import make_inputs, rel_rms, state_tensors

    from titans.ops.memory import chunk_memory

    kw, _ = make_inputs(B=1, T=max(lengths), H=2, D=16, depth=2, dtype=torch.float32, seed=5)
    kw["theta"] = kw["theta"] * 0.2
    kw["alpha"] = kw["alpha"] * 0.01
    print("bf16 products against float32 products, relative RMS (chunk 16)")
    print(f"  {'tokens':>7} | {'weights (max)':>13} | {'whole state (max)':>17} | {'outputs':>8}")
    for T in lengths:
        part = {k: (v[:, :T] if torch.is_tensor(v) else v) for k, v in kw.items()}
        y32, s32 = chunk_memory(**part, chunk_size=16)
        y16, s16 = chunk_memory(**part, chunk_size=16, product_dtype=torch.bfloat16)
        w = max(rel_rms(a, b) for a, b in zip(s16.weights, s32.weights))
        whole = max(rel_rms(a, b) for a, b in zip(state_tensors(s16), state_tensors(s32)))
        print(f"  {T:>7,} | {w:>13.1e} | {whole:>17.1e} | {rel_rms(y16, y32):>8.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096, help="speed: tokens per row (default 4096)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="speed: skip the compiled rows")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-error", action="store_true")
    p.add_argument("--error-lengths", type=int, nargs="+", default=[256, 1024, 2048, 8192])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _measure import machine_name

    print(machine_name())
    if not args.skip_speed:
        speed(args.length, args.rounds, not args.no_compile)
    if not args.skip_error:
        error(args.error_lengths)


if __name__ == "__main__":
    main()
