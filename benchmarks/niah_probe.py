"""Probe a NIAH checkpoint trained on pair-pk needles (docs/niah_demo.md): recall against the
stretch of noise haystack between a needle and its question, and the growth of the memory weights
while the noise haystack streams.

    python benchmarks/niah_probe.py gaps titans/checkpoints/niah-pair-lmm-3
    python benchmarks/niah_probe.py drift titans/checkpoints/niah-pair-lmm-3 --tokens 24576

``gaps``: for each (passages before the needle, passages between needle and question), 8 keys
with random 3-digit values; a hit is the value as the most likely next token after
``"Recall the pair: {key}"``. One passage is the noise haystack's 24-token paragraph.
``drift``: the largest per-head Frobenius norm of each block's memory weights every 4,096 tokens.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

CELLS = [(1, 2), (1, 8), (1, 12), (1, 16), (1, 32), (1, 64), (1, 128), (64, 2), (256, 2)]
KEYS = ["apple", "river", "castle", "pencil", "garden", "doctor", "window", "engine"]


def gaps(model, tok) -> None:
    from titans.tasks.niah import NOISE_SENTENCES

    rng = np.random.default_rng(0)
    print(f"{'before':>6} {'between':>7} {'tokens':>6} | recalled  mean log p(value)")
    for before, between in CELLS:
        hits, logp = 0, 0.0
        for key in KEYS:
            value = int(rng.integers(100, 1000))
            text = (" ".join([NOISE_SENTENCES] * before) + f"\nRemember the pair: {key} {value}.\n"
                    + " ".join([NOISE_SENTENCES] * between) + f"\nRecall the pair: {key}")  # fmt: skip
            ids = torch.tensor([tok.encode(text)])
            (target,) = tok.encode(f" {value}")
            with torch.inference_mode():
                lp = model(ids)[0][0, -1].float().log_softmax(-1)
            hits += int(lp.argmax() == target)
            logp += float(lp[target])
        print(f"{before:>6} {between:>7} {ids.shape[1]:>6} | {hits}/{len(KEYS)}      {logp / len(KEYS):.2f}", flush=True)


def drift(model, tok, tokens: int) -> None:
    from titans.tasks.niah import NOISE_SENTENCES

    unit = tok.encode(" " + NOISE_SENTENCES)
    ids = torch.tensor([(unit * (tokens // len(unit) + 1))[:tokens]])
    state = None
    print("tokens | largest head norm of the memory weights, per block")
    with torch.inference_mode():
        for t in range(0, tokens, 4096):
            _, _, state = model(ids[:, t : t + 4096], state=state)
            norms = [max(float(w.norm(dim=(-2, -1)).max()) for w in layer.memory.memory.weights) for layer in state.layers]
            print(f"{min(t + 4096, tokens):>6} | " + "  ".join(f"{n:.2f}" for n in norms), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("gaps", "drift"))
    p.add_argument("checkpoint", help="checkpoint or run directory of a model trained with the words tokenizer")
    p.add_argument("--tokens", type=int, default=24576, help="drift: tokens of noise haystack to stream")
    args = p.parse_args()
    from titans.train.checkpoint import load_pretrained

    model, tok, info = load_pretrained(args.checkpoint)
    if args.what == "drift" and model.cfg.variant in ("transformer", "swa"):
        p.error(f"drift reads the neural memory's weights; {args.checkpoint} is a {model.cfg.variant} (no memory)")
    print(f"{args.checkpoint} (step {info['step']})")
    gaps(model, tok) if args.what == "gaps" else drift(model, tok, args.tokens)


if __name__ == "__main__":
    main()
