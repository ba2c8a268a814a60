"""Throughput and peak memory of the neural memory layer, ours against titans-pytorch.

Prints one table: tokens/s for forward+backward (training) and forward only (no_grad), and the
peak memory of the forward+backward step, for

- ``titans`` chunk path (``NeuralMemory``) at B=4, dim 256, 4 heads of 64, depth 2, expansion 4,
  chunk 64, T in {1K, 4K, 16K}, eager and with ``compile=True`` (compile time not counted: it
  happens in the warm-up step, which is also when the peak memory is reached);
- the naive token loop at a small T (it keeps every token's weights for backward);
- ``titans-pytorch``'s ``NeuralMemory`` at the matching configuration, when installed, with its
  default setting (all gradients at the initial weights of the call) and with ``batch_size=64``
  (gradients at the chunk-start weights, as ours);
- with ``--rules``, each named memory rule (``NeuralMemory.from_rule``, rows ``rule-NAME``);
- with ``--muon``, ATLAS's Muon alone: the layer with ``window=8, muon_steps=5`` and no feature map
  (row ``muon``); with ``--ns-direct`` each Muon row again with Newton-Schulz run as Muon writes it
  instead of in its Gram form (rows ``*-ns-direct``: the chunk path before the Gram form);
- with ``--bf16``, each implementation again under ``torch.autocast(bfloat16)`` (rows ``*-bf16``),
  ours with ``product_dtype="bfloat16"`` as well (its chunk products in bf16, its state float32;
  autocast alone leaves our memory in float32).

Each training row also states its matrix-product FLOPs per token (every mm / bmm / addmm / baddbmm
of one step, counted at the dispatcher) and the tokens/s those products alone would allow at the
rate of a 2048^2 matmul on the same threads: a practical ceiling for that arithmetic on this
machine, whatever its elementwise work and overheads.

Each configuration runs in its own subprocess so that peak memory is measured in isolation: on CPU
it is the rise of the resident set's high-water mark (VmHWM, reset before the step) over the
resident size after setup; on CUDA, ``torch.cuda.max_memory_allocated``.

    python benchmarks/memory_throughput.py                 # full table (several minutes)
    python benchmarks/memory_throughput.py --lengths 1024 4096 --skip-naive
    python benchmarks/memory_throughput.py --lengths 4096 --skip-naive --impls titans titans-pytorch titans-pytorch-b64
    python benchmarks/memory_throughput.py --lengths 4096 --skip-naive --impls titans titans-pytorch --bf16
    python benchmarks/memory_throughput.py --lengths 4096 --skip-naive --impls titans --rules titans moneta yaad omega
    python benchmarks/memory_throughput.py --lengths 4096 --skip-naive --impls titans --rules titans memora
    python benchmarks/memory_throughput.py --lengths 64 --skip-naive --impls titans --rules titans omega atlas
    python benchmarks/memory_throughput.py --lengths 128 --skip-naive --impls titans --rules omega --muon --ns-direct

ATLAS (``--rules atlas``) orthogonalises every token's momentum, and its degree-2 keys make the first
layer 256 x 2145 at this size: about 1 GFLOP of Newton-Schulz per token and head in the Gram form
(3 as Muon writes it), so its rows take a minute or more per step even at T=64
(titans/ops/memory/README.md, "Muon: the ATLAS inner optimiser").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _measure import count_matmul_flops, gemm_rate, machine_name, peak_tracker

B, DIM, HEADS, HEAD_DIM, DEPTH, EXPANSION, CHUNK = 4, 256, 4, 64, 2, 4.0, 64


# ---- measurement inside one subprocess -------------------------------------------------------


def _build(impl: str, device):
    bf16 = impl.endswith("-bf16")
    impl = impl.removesuffix("-bf16")
    if impl.endswith("-ns-direct"):  # the chunk path's Newton-Schulz as Muon writes it (no Gram form)
        import functools

        import titans.ops.memory.chunk as chunk_mod
        from titans.ops.memory.muon import newton_schulz

        chunk_mod.newton_schulz = functools.partial(newton_schulz, gram=False)
        impl = impl.removesuffix("-ns-direct")
    if impl == "muon":  # ATLAS's Muon without its feature map: the Omega window 8, 5 Newton-Schulz steps
        from titans.layers import NeuralMemory

        layer = NeuralMemory(DIM, heads=HEADS, head_dim=HEAD_DIM, depth=DEPTH, expansion=EXPANSION, chunk_size=CHUNK,
                             max_grad_norm=None, window=8, muon_steps=5).to(device)  # fmt: skip
        return lambda x: layer(x)[0], layer
    if impl.startswith("rule-"):  # a named memory rule (titans.ops.memory.rules), eager
        from titans.layers import NeuralMemory

        layer = NeuralMemory.from_rule(impl.removeprefix("rule-"), DIM, heads=HEADS, head_dim=HEAD_DIM, depth=DEPTH,
                                       expansion=EXPANSION, chunk_size=CHUNK, max_grad_norm=None).to(device)  # fmt: skip
        return lambda x: layer(x)[0], layer
    if impl in ("titans", "titans-compile", "titans-naive"):
        from titans.layers import NeuralMemory

        # max_grad_norm=None: the paper's update, the same math titans-pytorch computes
        layer = NeuralMemory(DIM, heads=HEADS, head_dim=HEAD_DIM, depth=DEPTH, expansion=EXPANSION,
                             chunk_size=CHUNK, compile=impl == "titans-compile", max_grad_norm=None,
                             product_dtype="bfloat16" if bf16 else None)  # fmt: skip
        if impl == "titans-naive":
            from titans.ops.memory import naive_memory
            import titans.layers.neural_memory as nm

            def naive_as_chunk(**kw):
                kw.pop("compile", None), kw.pop("product_dtype", None)
                return naive_memory(**kw)

            nm.chunk_memory = naive_as_chunk  # route the layer through the token loop
        layer = layer.to(device)
        return lambda x: layer(x)[0], layer
    from titans_pytorch import NeuralMemory as TPNeuralMemory

    kwargs = dict(dim=DIM, heads=HEADS, dim_head=HEAD_DIM, chunk_size=CHUNK,
                  default_model_kwargs=dict(depth=DEPTH, expansion_factor=EXPANSION))  # fmt: skip
    if impl == "titans-pytorch-b64":
        kwargs["batch_size"] = CHUNK
    layer = TPNeuralMemory(**kwargs).to(device)

    def run(x):
        out = layer(x)
        return out[0] if isinstance(out, tuple) else out

    return run, layer


def measure(impl: str, T: int, mode: str, min_seconds: float, tune: bool) -> dict:
    if tune:  # the same allocator setting for every implementation measured
        from titans.runtime.cpu import tune_cpu_allocator

        tune_cpu_allocator()
    import torch

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run, layer = _build(impl, device)
    x = torch.randn(B, T, DIM, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=impl.endswith("-bf16"))

    def step():
        if mode == "fwd":
            with torch.no_grad(), autocast:
                run(x)
        else:
            layer.zero_grad(set_to_none=True)
            with autocast:
                loss = run(x).float().square().mean()
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    with peak_tracker() as peak:  # the warm-up step counts: its allocations are real
        step()
        iters, start = 0, time.perf_counter()
        while True:
            step()
            iters += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
    peak = peak.value
    # after timing (the counting mode slows the step it watches); the training rows report it
    flops = count_matmul_flops(step) if mode == "fwdbwd" else None
    return dict(impl=impl, T=T, mode=mode, tokens_per_s=B * T * iters / elapsed, peak_bytes=peak, iters=iters,
                matmul_flops=flops)


# ---- driver ----------------------------------------------------------------------------------


def _run_one(impl: str, T: int, mode: str, min_seconds: float, tune: bool) -> dict | None:
    cmd = [sys.executable, __file__, "--one", impl, str(T), mode, str(min_seconds), str(int(tune))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  [{impl} T={T} {mode}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--peer-lengths", type=int, nargs="+", default=[4096], help="lengths for titans-pytorch")
    p.add_argument("--naive-length", type=int, default=256)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--impls", nargs="+", choices=("titans", "titans-compile", "titans-pytorch", "titans-pytorch-b64"),
                   default=("titans", "titans-compile", "titans-pytorch", "titans-pytorch-b64"),
                   help="rows to measure (the naive row is controlled by --skip-naive)")
    p.add_argument("--rules", nargs="+", default=(), help="also measure these named memory rules (rows rule-NAME: "
                   "titans, moneta, yaad, memora, omega, atlas; titans.ops.memory.rules), eager")
    p.add_argument("--muon", action="store_true",
                   help="also measure ATLAS's Muon alone (row muon: window=8, muon_steps=5, no feature map)")
    p.add_argument("--ns-direct", action="store_true",
                   help="also measure each Muon row (muon, rule-atlas) with Newton-Schulz as Muon writes it "
                        "(rows *-ns-direct)")
    p.add_argument("--bf16", action="store_true",
                   help="also measure each chosen implementation under bf16 autocast (rows *-bf16; ours with "
                        "product_dtype='bfloat16')")
    p.add_argument("--min-seconds", type=float, default=5.0, help="time each measurement at least this long")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="do not apply titans.runtime.cpu.tune_cpu_allocator() (applied to every implementation by default)")
    p.add_argument("--one", nargs=5, metavar=("IMPL", "T", "MODE", "SECONDS", "TUNE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        impl, T, mode, secs, tune = args.one
        print(json.dumps(measure(impl, int(T), mode, float(secs), tune == "1")))
        return
    tune = not args.no_tune_allocator

    try:
        import titans_pytorch  # noqa: F401

        have_peer = True
    except ImportError:
        have_peer = False
    variants = ("", "-bf16") if args.bf16 else ("",)
    ours_impls = [i + v for i in ("titans", "titans-compile") if i in args.impls for v in variants]
    peer_impls = [i + v for i in ("titans-pytorch", "titans-pytorch-b64") if i in args.impls for v in variants]
    from titans.ops.memory.rules import rule_settings

    for name in args.rules:
        try:
            rule_settings(name)
        except ValueError as err:
            p.error(str(err))
    ours_impls += [f"rule-{name}" for name in args.rules]
    ours_impls += ["muon"] if args.muon else []
    if args.ns_direct:  # each Muon row, then the same with the iteration as written
        muon_rows = {"muon", "rule-atlas"}
        ours_impls = [row for impl in ours_impls for row in ((impl, f"{impl}-ns-direct") if impl in muon_rows else (impl,))]
    plan = [(impl, T) for impl in ours_impls for T in args.lengths]
    if not args.skip_naive:
        plan.append(("titans-naive", args.naive_length))
    if have_peer:
        plan += [(impl, T) for impl in peer_impls for T in args.peer_lengths]
    else:
        print("titans-pytorch is not installed: its rows are skipped (pip install titans-pytorch)\n")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(machine_name(device))
    print(f"B={B}, dim={DIM}, heads={HEADS}x{HEAD_DIM}, memory depth {DEPTH}, expansion {EXPANSION:g}, "
          f"chunk {CHUNK}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; allocator tuned: {tune}")  # fmt: skip
    header = (f"{'implementation':<25} {'T':>6} | {'fwd+bwd tok/s':>13} {'peak MB':>8} {'MFLOP/tok':>9} "
              f"{'bound tok/s':>11} | {'fwd tok/s':>10}")
    print(header)
    print("-" * len(header))
    # The rate a large matmul reaches on these threads: a step's matrix products alone, at that rate,
    # bound its tokens/s from above ("bound tok/s"; elementwise work and overheads only add time).
    gemm = {"": gemm_rate(device)}  # (GFLOP/s, n of the n^2 matmul it was measured at)
    if args.bf16:  # the *-bf16 rows' products run in bf16: bound them by its rate
        gemm["-bf16"] = gemm_rate(device, torch.bfloat16)
    rows = {}
    for impl, T in plan:
        train = _run_one(impl, T, "fwdbwd", args.min_seconds, tune)
        infer = _run_one(impl, T, "fwd", args.min_seconds, tune)
        rows[(impl, T)] = (train, infer)
        if train:
            per_token = train["matmul_flops"] / (B * T)
            rate = gemm["-bf16" if impl.endswith("-bf16") else ""][0] * 1e9
            tr = (f"{train['tokens_per_s']:>13,.0f} {train['peak_bytes'] / 2**20:>8,.0f} {per_token / 1e6:>9.2f} "
                  f"{rate / per_token:>11,.0f}")
        else:
            tr = f"{'failed':>13} {'':>8} {'':>9} {'':>11}"
        fw = f"{infer['tokens_per_s']:>10,.0f}" if infer else f"{'failed':>10}"
        print(f"{impl:<25} {T:>6} | {tr} | {fw}", flush=True)

    bf16_note = ""
    if args.bf16:
        rate, n = gemm["-bf16"]
        bf16_note = f" ({rate:.3g} for a {n}^2 bf16 matmul, the *-bf16 rows' bound"
        # gemm_rate falls back to 512^2 only for torch's slow bf16 path, whose rate depends on the size
        bf16_note += ": torch's slow bf16 fallback, whose rate varies with the size, so no real bound)" if n != 2048 else ")"
    print(f"\nMFLOP/tok: matrix-product FLOPs of one training step per token (counted at the dispatcher); "
          f"bound tok/s: the tokens/s those products alone allow at {gemm[''][0]:.3g} GFLOP/s, the rate of a "
          f"{gemm[''][1]}^2 float32 matmul on these threads{bf16_note}")
    # Ratios measured in this run.
    print()
    for ours_impl in ours_impls:
        ours = {T: rows.get((ours_impl, T)) for T in args.lengths}
        if ours.get(1024) and ours.get(16384) and ours[1024][0] and ours[16384][0]:
            r = ours[16384][0]["tokens_per_s"] / ours[1024][0]["tokens_per_s"]
            print(f"{ours_impl} linear cost: fwd+bwd tok/s at 16K / at 1K = {r:.2f}")
    for ours_impl in ours_impls:
        for peer in peer_impls:
            for T in args.peer_lengths:
                theirs, mine = rows.get((peer, T)), rows.get((ours_impl, T))
                if theirs and mine and theirs[0] and mine[0]:
                    speed = mine[0]["tokens_per_s"] / theirs[0]["tokens_per_s"]
                    mem = mine[0]["peak_bytes"] / max(theirs[0]["peak_bytes"], 1)
                    fwd = mine[1]["tokens_per_s"] / theirs[1]["tokens_per_s"] if mine[1] and theirs[1] else float("nan")
                    print(f"{ours_impl} vs {peer} at T={T}: {speed:.2f}x fwd+bwd tok/s, "
                          f"{mem:.2f}x peak memory, {fwd:.2f}x fwd tok/s")  # fmt: skip


if __name__ == "__main__":
    main()
