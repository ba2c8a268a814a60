"""Streaming with the memory compiled: one compiled call per chunk, groups of chunks, whole MAC segments.

Without gradients, ``chunk_memory(compile=True)`` runs ``_GROUP`` fresh full chunks in one compiled
call (``_chunk_group_forward``); with small chunks and few rows, a call's fixed overhead is most of
a chunk's time. A MAC model goes further: each whole segment (read, attention, memorise) is one
compiled graph (``MACBlock._segment_step``). This script streams the same prompt eagerly,
compiled one chunk per call (grouping switched off), compiled in groups and, for MAC, in whole
segments, interleaving the paths ``--rounds`` times in one process so that the machine's load
falls on all of them alike, and prints every round's tokens/s.

    python benchmarks/compile_grouping.py --recipe experiments/recipes/niah-pair-lmm-3.yaml --batch 1
    python benchmarks/compile_grouping.py --recipe experiments/recipes/niah-pair-mac-2.yaml --batch 1 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream_throughput import model_from_recipe, stream  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "recipes" / "niah-pair-lmm-3.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=RECIPE, help="recipe whose 'model' section sets the model")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per row per measurement")
    p.add_argument("--piece", type=int, default=4096, help="tokens per model call")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="rows streamed side by side (one table each)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurements of each path")
    args = p.parse_args()
    if args.tokens < args.piece or min(args.piece, *args.batch, args.threads, args.rounds) < 1:
        p.error("need --tokens >= --piece >= 1 and --batch, --threads, --rounds >= 1")
    import torch

    import titans.blocks.mac as mac_mod
    import titans.ops.memory.chunk as chunk_mod
    from titans.runtime.cpu import tune_cpu_allocator

    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    torch.manual_seed(0)
    eager = model_from_recipe(args.recipe)
    compiled = model_from_recipe(args.recipe).set_memory_compile(True)
    group, applies = chunk_mod._GROUP, mac_mod.MACBlock._compiled_segment_applies
    # name -> (model, chunks per compiled call, whole MAC segments compiled)
    paths = {"eager": (eager, group, False), "compiled, 1 chunk a call": (compiled, 10**9, False),
             f"compiled, {group} chunks a call": (compiled, group, False)}  # fmt: skip
    if eager.cfg.variant == "mac":
        paths["compiled, whole MAC segments"] = (compiled, group, True)

    def use(g: int, segments: bool) -> None:
        chunk_mod._GROUP = g
        mac_mod.MACBlock._compiled_segment_applies = applies if segments else (lambda *a: False)

    try:
        for batch in args.batch:
            for model, g, segments in paths.values():  # warm-up: compiles every compiled path
                use(g, segments)
                stream(model, batch, args.piece, args.piece)
            results = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, (model, g, segments) in paths.items():
                    use(g, segments)
                    results[name].append(stream(model, batch, args.tokens, args.piece)["tokens_per_s"])
            print(f"{args.recipe.name}: batch {batch}, {args.tokens:,} tokens per row per round, "
                  f"{args.threads} thread(s); tokens/s per round")  # fmt: skip
            for name, tps in results.items():
                print(f"{name:>30} | " + "  ".join(f"{x:>8,.0f}" for x in tps))
    finally:
        use(group, True)


if __name__ == "__main__":
    main()
