"""Training and decoding speed of every model variant, and titans-pytorch's MAC when installed.

Prints two tables:

1. training: tokens/s of forward+backward (next-token loss) and peak memory at T in {1K, 4K, 16K}
   for mac, mag, mal, lmm, transformer (Transformer++) and swa at one small size (dim 256,
   depth 2, 4 heads, segment/window 128, memory chunk 64), and titans-pytorch's
   ``MemoryAsContextTransformer`` at the matching size (dim 256, depth 2, segment 128);
2. decoding: after reading 1K, 10K and 100K tokens (prefilled in 4K pieces with the state),
   one-token decode speed, the recurrent state's size and the process's resident memory (with
   ``--compile`` also the memory variants' compiled one-token step, rows ``<variant>+compile``,
   compiled before timing).

Every measurement runs in its own subprocess. ``titans.runtime.cpu.tune_cpu_allocator()`` is
applied to every implementation unless ``--no-tune-allocator``.

    python benchmarks/model_throughput.py
    python benchmarks/model_throughput.py --lengths 1024 4096 --contexts 1000 10000
    python benchmarks/model_throughput.py --lengths 4096 --variants mac --skip-decode
    python benchmarks/model_throughput.py --lengths 4096 --variants mac --skip-decode --compile
    python benchmarks/model_throughput.py --skip-train --variants mac --compile --contexts 1000 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _measure import peak_tracker, rss_bytes

B = 2
DIM, DEPTH, HEADS, SEGMENT, VOCAB = 256, 2, 4, 128, 256
VARIANTS = ("mac", "mag", "mal", "lmm", "transformer", "swa")


def _ours(impl: str):
    """``impl``: a variant name, or ``<variant>+compile`` for its memory run through torch.compile.
    The inner-gradient clip keeps an untrained MAG finite on random bytes (unclipped, its memory
    diverges within ~600 tokens of repeated byte keys, even with theta bounded by 0.01)."""
    from titans.model import TitansConfig, TitansLM

    variant, _, compiled = impl.partition("+")
    cfg = TitansConfig(variant=variant, vocab_size=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS,
                       window=SEGMENT, segment=SEGMENT, memory_chunk=64, persistent_tokens=4,
                       memory_max_grad_norm=10.0)  # fmt: skip
    return TitansLM(cfg).set_memory_compile(compiled == "compile")


def _peer():
    from titans_pytorch import MemoryAsContextTransformer

    return MemoryAsContextTransformer(num_tokens=VOCAB, dim=DIM, depth=DEPTH, segment_len=SEGMENT,
                                      num_persist_mem_tokens=4, num_longterm_mem_tokens=4,
                                      dim_head=DIM // HEADS, heads=HEADS)  # fmt: skip


def train_step_speed(impl: str, T: int, min_seconds: float) -> dict:
    import torch

    torch.manual_seed(0)
    model = _peer() if impl == "titans-pytorch-mac" else _ours(impl)
    ids = torch.randint(0, VOCAB, (B, T + 1 if impl == "titans-pytorch-mac" else T))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, return_loss=True) if impl == "titans-pytorch-mac" else model(ids, labels=ids)[1]
        loss.backward()

    with peak_tracker() as peak:
        step()  # warm-up, counted in the peak (with "+compile": compiles forward and backward)
        if impl.endswith("+compile"):
            step()  # a possible recompile with dynamic shapes also stays out of the timing
        iters, start = 0, time.perf_counter()
        while True:
            step()
            iters += 1
            if time.perf_counter() - start >= min_seconds:
                break
        elapsed = time.perf_counter() - start
    return dict(tokens_per_s=B * T * iters / elapsed, peak_bytes=peak.value)


def decode_speed(impl: str, contexts: list[int], new_tokens: int) -> list[dict]:
    import torch

    torch.manual_seed(0)
    rows = []
    if impl == "titans-pytorch-mac":
        model = _peer().eval()
        forward, marks = model.forward, []

        def timed_forward(*a, **kw):  # its sample() prefills in the first call: decoding starts after it
            out = forward(*a, **kw)
            marks.append(time.perf_counter())
            return out

        model.forward = timed_forward
        for n in contexts:
            prompt = torch.randint(0, VOCAB, (1, n))
            marks.clear()
            model.sample(prompt, n + new_tokens, use_cache=True, show_progress=False)
            end = time.perf_counter()
            rows.append(dict(context=n, tokens_per_s=new_tokens / (end - marks[0]), state_bytes=None,
                             rss_bytes=rss_bytes(), note="after its prefill"))  # fmt: skip
        return rows
    from titans.inference.state_io import state_num_bytes

    model = _ours(impl).eval()
    state, seen = None, 0
    with torch.no_grad():
        if impl.endswith("+compile"):  # compile the prefill's segment graph and the one-token step
            _, _, warm = model(torch.randint(0, VOCAB, (1, 2 * SEGMENT)))
            for _ in range(SEGMENT + 2):
                _, _, warm = model(torch.randint(0, VOCAB, (1, 1)), state=warm)
        for n in contexts:
            while seen < n:  # read up to n tokens in 4K pieces, carrying the state
                piece = min(4096, n - seen)
                _, _, state = model(torch.randint(0, VOCAB, (1, piece)), state=state)
                seen += piece
            tok = torch.randint(0, VOCAB, (1, 1))
            start = time.perf_counter()
            for _ in range(new_tokens):
                logits, _, state = model(tok, state=state)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            elapsed = time.perf_counter() - start
            seen += new_tokens
            rows.append(dict(context=n, tokens_per_s=new_tokens / elapsed, state_bytes=state_num_bytes(state),
                             rss_bytes=rss_bytes(), note=""))  # fmt: skip
    return rows


def _sub(args: list[str]) -> dict | list | None:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  [{' '.join(args)}] failed:\n{proc.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--peer-lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--contexts", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--no-tune-allocator", action="store_true")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS, help="our model variants to measure")
    p.add_argument("--skip-decode", action="store_true", help="measure training only (skip the decoding table)")
    p.add_argument("--skip-train", action="store_true", help="measure decoding only (skip the training table)")
    p.add_argument("--compile", action="store_true",
                   help="also train each memory variant with its memory compiled (rows '<variant>+compile'), "
                        "and decode with their compiled one-token step")
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        if args.one[0] == "1":
            from titans.runtime.cpu import tune_cpu_allocator

            tune_cpu_allocator()
        kind, impl = args.one[1], args.one[2]
        if kind == "train":
            print(json.dumps(train_step_speed(impl, int(args.one[3]), float(args.one[4]))))
        else:
            print(json.dumps(decode_speed(impl, [int(c) for c in args.one[4:]], int(args.one[3]))))
        return
    tune = "0" if args.no_tune_allocator else "1"
    try:
        import titans_pytorch  # noqa: F401

        peer = ["titans-pytorch-mac"]
    except ImportError:
        peer = []
        print("titans-pytorch is not installed: its rows are skipped (pip install titans-pytorch)\n")

    train = {}
    if not args.skip_train:
        print(f"training: B={B}, dim {DIM}, depth {DEPTH}, {HEADS} heads, segment/window {SEGMENT}; allocator tuned: {tune == '1'}")
        head = f"{'model':<20} {'T':>6} | {'tok/s':>8} {'peak MB':>8}"
        print(head + "\n" + "-" * len(head))
        for impl in list(args.variants) + _compiled(args) + peer:
            for T in args.peer_lengths if impl in peer else args.lengths:
                r = _sub(["--one", tune, "train", impl, str(T), str(args.min_seconds)])
                train[(impl, T)] = r
                cells = f"{r['tokens_per_s']:>8,.0f} {r['peak_bytes'] / 2**20:>8,.0f}" if r else f"{'failed':>8} {'':>8}"
                print(f"{impl:<20} {T:>6} | {cells}", flush=True)

    decode = {} if args.skip_decode else _decode_table(args, tune, peer)
    _ratios(args, train, decode)


def _compiled(args) -> list[str]:
    """With --compile: the memory variants again, their memory (and decode step) compiled."""
    return [f"{v}+compile" for v in args.variants if v not in ("transformer", "swa")] if args.compile else []


def _decode_table(args, tune: str, peer: list[str]) -> dict:
    print(f"\ndecoding (B=1, {args.new_tokens} tokens after the context)")
    head = f"{'model':<20} {'context':>8} | {'tok/s':>8} {'state MB':>9} {'RSS MB':>8}"
    print(head + "\n" + "-" * len(head))
    decode = {}
    for impl in list(args.variants) + _compiled(args) + peer:
        rows = _sub(["--one", tune, "decode", impl, str(args.new_tokens), *map(str, args.contexts)])
        for r in rows or []:
            decode[(impl, r["context"])] = r
            state = f"{r['state_bytes'] / 2**20:>9.2f}" if r["state_bytes"] is not None else f"{'-':>9}"
            print(f"{impl:<20} {r['context']:>8} | {r['tokens_per_s']:>8,.1f} {state} {r['rss_bytes'] / 2**20:>8,.0f} {r['note']}",
                  flush=True)  # fmt: skip
    return decode


def _ratios(args, train: dict, decode: dict) -> None:
    print()
    for T in args.lengths:
        a, b = train.get(("mac", args.lengths[0])), train.get(("mac", T))
        if a and b:
            print(f"mac training tok/s at T={T} / at T={args.lengths[0]}: {b['tokens_per_s'] / a['tokens_per_s']:.2f}")
    for T in args.peer_lengths:
        for impl in ("mac", "mac+compile"):
            mine, theirs = train.get((impl, T)), train.get(("titans-pytorch-mac", T))
            if mine and theirs:
                print(f"{impl} vs titans-pytorch MAC at T={T}: {mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tok/s, "
                      f"{mine['peak_bytes'] / theirs['peak_bytes']:.2f}x peak memory")  # fmt: skip
    for n in args.contexts:
        for impl in ("mac", "mac+compile"):
            mine, theirs = decode.get((impl, n)), decode.get(("titans-pytorch-mac", n))
            if mine and theirs:
                print(f"{impl} vs titans-pytorch MAC decoding after {n:,} tokens: "
                      f"{mine['tokens_per_s'] / theirs['tokens_per_s']:.1f}x tok/s")  # fmt: skip


if __name__ == "__main__":
    main()
