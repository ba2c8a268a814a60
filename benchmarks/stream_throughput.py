"""Streaming inference speed of the NIAH demo's tiny MAC: tokens/s and peak resident memory.

Reads a long random byte stream through ``experiments/recipes/niah-mac.yaml``'s model (randomly
initialised: weights do not change the speed) in pieces with the state, under
``torch.inference_mode()``, as ``titans eval niah`` streams its haystacks. One row per batch size.

    python benchmarks/stream_throughput.py
    python benchmarks/stream_throughput.py --tokens 65536 --piece 4096 --batch 1 16 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "recipes" / "niah-mac.yaml"


def model_from_recipe(path: Path):
    """The recipe's model config as a randomly initialised TitansLM (eval mode)."""
    from titans.io.config_files import load_config_file
    from titans.model import TitansConfig, TitansLM

    cfg = load_config_file(path)
    if "model" not in cfg:
        raise ValueError(f"{path} has no 'model' section")
    return TitansLM(TitansConfig.from_dict(cfg["model"])).eval()


def stream(model, batch: int, tokens: int, piece: int) -> dict:
    """Read ``tokens`` tokens per row for ``batch`` rows in pieces of ``piece`` with the state.
    The first piece is a warm-up (not timed, but inside the peak)."""
    import torch

    from titans.runtime.resident import PeakResident

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, tokens + piece), generator=g)
    with PeakResident() as peak, torch.inference_mode():
        _, _, state = model(ids[:, :piece], logits_to_keep=1)  # warm-up piece
        start = time.perf_counter()
        for t in range(piece, piece + tokens, piece):
            _, _, state = model(ids[:, t : t + piece], state=state, logits_to_keep=1)
        elapsed = time.perf_counter() - start
    return dict(tokens_per_s=batch * tokens / elapsed, seconds=elapsed, peak_mb=peak.peak_mb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=RECIPE, help="recipe whose 'model' section sets the model")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per row to stream (after one warm-up piece)")
    p.add_argument("--piece", type=int, default=4096, help="tokens per model call")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes to measure")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-tune-allocator", action="store_true", help="leave glibc's allocator as it is")
    p.add_argument("--compile", action="store_true", help="run the memory through torch.compile (warm-up compiles)")
    args = p.parse_args()
    if args.tokens < args.piece or args.piece < 1:
        p.error(f"need --tokens >= --piece >= 1, got {args.tokens} and {args.piece}")
    if args.threads < 1 or min(args.batch) < 1:
        p.error("--threads and --batch must be >= 1")
    import torch

    from titans.runtime.cpu import tune_cpu_allocator

    torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_allocator else tune_cpu_allocator()
    torch.manual_seed(0)
    model = model_from_recipe(args.recipe).set_memory_compile(args.compile)
    print(f"{args.recipe.name}: {args.tokens:,} tokens per row in pieces of {args.piece:,}, "
          f"{args.threads} thread(s), allocator tuned: {tuned}, memory compiled: {args.compile}")  # fmt: skip
    head = f"{'batch':>5} | {'tok/s':>9} {'seconds':>8} {'peak RSS MB':>12}"
    print(head + "\n" + "-" * len(head))
    for b in args.batch:
        r = stream(model, b, args.tokens, args.piece)
        print(f"{b:>5} | {r['tokens_per_s']:>9,.0f} {r['seconds']:>8.1f} {r['peak_mb']:>12,.0f}", flush=True)


if __name__ == "__main__":
    main()
