"""Does a tiny model learn to retrieve through its memory? Key-value recall beyond the window.

Each row (``--length`` tokens) is a repeating filler cycle with ``--pairs`` needles
``[NEEDLE, key, value]`` in its first half and, in its second half, the questions
``[QUESTION, key, value]`` in shuffled order: the value after a question's key is only predictable
by recalling its needle, which lies beyond the attention window (``--window``, the MAC segment /
MAG and SWA window) for nearly every pair. Every token is scored, answers ``--answer-weight``
times as much. The script trains each ``--configs`` entry with AdamW and prints the held-out
answer accuracy every ``--eval-every`` steps (chance: 1 / values).

What it showed (docs/experiments/single-needle.md, "What made the memory learn to retrieve"; defaults, one thread):
the LMM with ``memory_associative_init`` (and M_0's output at zero, as every config here) went
2.2% / 64.8% / 93.4% / 99.8% answer accuracy at steps 100 / 125 / 150 / 250; the same LMM without
the associative init stayed at chance (0.2-0.8%) for all 250 steps.

    OMP_NUM_THREADS=1 python recall_learning.py --configs lmm-assoc,lmm --steps 250
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from titans.model import TitansConfig, TitansLM

FILLER, KEYS, VALUES = 20, 200, 200
KEY0, VALUE0 = FILLER, FILLER + KEYS
NEEDLE, QUESTION = FILLER + KEYS + VALUES, FILLER + KEYS + VALUES + 1
VOCAB = QUESTION + 1

# name -> (variant, associative init, MAC memory input); every config shares the memory settings below
CONFIGS = {
    "lmm-assoc": ("lmm", True, "attention"),
    "lmm": ("lmm", False, "attention"),
    "mag-assoc": ("mag", True, "attention"),
    "mac-assoc": ("mac", True, "attention"),
    "mac": ("mac", False, "attention"),
    "mac-residual-assoc": ("mac", True, "residual"),
}


def recall_rows(rng: np.random.Generator, n: int, length: int, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [n, length + 1], answer [n, length + 1])``: answer marks each question's value."""
    third = (length // 2) // 3
    if pairs > third - 1:
        raise ValueError(f"{pairs} pairs do not fit in rows of {length} tokens (at most {third - 1})")
    ids = np.zeros((n, length + 1), dtype=np.int64)
    answer = np.zeros((n, length + 1), dtype=bool)
    for r in range(n):
        ids[r] = (np.arange(length + 1) + rng.integers(FILLER)) % FILLER
        keys = rng.choice(KEYS, pairs, replace=False)
        values = rng.integers(VALUES, size=pairs)
        needles = np.sort(rng.choice(third, pairs, replace=False)) * 3
        questions = np.sort(rng.choice(np.arange(third + 1, (length + 1) // 3 - 1), pairs, replace=False)) * 3
        for i, p in enumerate(needles):
            ids[r, p : p + 3] = [NEEDLE, KEY0 + keys[i], VALUE0 + values[i]]
        for p, i in zip(questions, rng.permutation(pairs)):
            ids[r, p : p + 3] = [QUESTION, KEY0 + keys[i], VALUE0 + values[i]]
            answer[r, p + 2] = True
    return torch.from_numpy(ids), torch.from_numpy(answer)


def model_for(name: str, args) -> TitansLM:
    variant, associative, mac_input = CONFIGS[name]
    cfg = TitansConfig(
        variant=variant, vocab_size=VOCAB, dim=args.dim, depth=2, heads=4, segment=args.window,
        window=args.window, persistent_tokens=4, memory_chunk=args.chunk,
        memory_theta_activation="sigmoid", memory_max_lr=args.max_lr, memory_theta_init=args.theta_init,
        memory_eta_init=args.eta_init, memory_alpha_init=1e-4, memory_zero_init_output=True,
        memory_associative_init=associative, mac_memory_input=mac_input,
        memory_max_grad_norm=args.max_grad_norm,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return TitansLM(cfg)


def train(name: str, args) -> list[tuple[int, float, float]]:
    model = model_for(name, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng, held_out = np.random.default_rng(args.seed), np.random.default_rng(10_000 + args.seed)
    eval_ids, eval_answer = recall_rows(held_out, 32, args.length, args.pairs)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50)  # 50 warm-up steps
        ids, answer = recall_rows(rng, args.batch, args.length, args.pairs)
        logits, _, _ = model(ids[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        weight = 1.0 + (args.answer_weight - 1.0) * answer[:, 1:].flatten().float()
        loss = (ce * weight).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                logits, _, _ = model(eval_ids[:, :-1])
            mask = eval_answer[:, 1:]
            acc = (logits.argmax(-1) == eval_ids[:, 1:])[mask].float().mean().item()
            curve.append((step, acc, time.perf_counter() - start))
            print(f"  {name:>10}  step {step:>5}  answer accuracy {acc:6.1%}  ({curve[-1][2]:.0f} s)", flush=True)
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="lmm-assoc,lmm", help=f"comma-separated, from {sorted(CONFIGS)}")
    p.add_argument("--steps", type=int, default=250, help="training steps per config")
    p.add_argument("--length", type=int, default=256, help="tokens per row")
    p.add_argument("--pairs", type=int, default=20, help="needles (and questions) per row")
    p.add_argument("--window", type=int, default=32, help="MAC segment / MAG window")
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--chunk", type=int, default=4, help="memory chunk size")
    p.add_argument("--max-lr", type=float, default=0.1, help="memory learning-rate bound (sigmoid theta)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip each token's inner gradient to this norm (memory_max_grad_norm; default: no clip)")
    p.add_argument("--theta-init", type=float, default=0.03, help="untrained memory learning rate")
    p.add_argument("--eta-init", type=float, default=0.5, help="untrained momentum")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--answer-weight", type=float, default=10.0, help="loss weight of answer tokens")
    p.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed of model and data")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {sorted(CONFIGS)}")
    curves = {n: train(n, args) for n in names}
    print(f"\nanswer accuracy on 32 held-out rows (chance {1 / VALUES:.1%}); "
          f"rows of {args.length} tokens, {args.pairs} pairs, window {args.window}")  # fmt: skip
    steps = [s for s, _, _ in next(iter(curves.values()))]
    print("| config | " + " | ".join(f"step {s}" for s in steps) + " | seconds |")
    print("|---|" + "---|" * (len(steps) + 1))
    for n, curve in curves.items():
        print(f"| {n} | " + " | ".join(f"{a:.1%}" for _, a, _ in curve) + f" | {curve[-1][2]:.0f} |")


if __name__ == "__main__":
    main()
