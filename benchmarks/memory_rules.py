"""Which memory rule learns to recall? Every named rule on the same model, data and budget.

Each rule of ``titans.ops.memory.rules`` (``--rules``; default: all of them) becomes the memory of
the same LMM (``TitansConfig.with_memory_rule``: the memory alone, so the rule decides), trained
with AdamW from the same seed on the same rows, on two tasks:

- ``kv``: key-value recall beyond any window (``recall_learning.py``'s rows: needles
  ``[NEEDLE, key, value]`` in the first half of a row, their questions in shuffled order in the
  second; every token scored, answers ``--answer-weight`` times as much); accuracy of the answers;
- ``mqar``: Zoology's multi-query associative recall (``titans.tasks.mqar``: pairs first, queries
  later at power-law gaps, random filler); accuracy of the queried values (the only targets).

It prints held-out accuracy every ``--eval-every`` steps, the parameter count (non-embedding) and
the training speed of each rule, as one table per task:

    OMP_NUM_THREADS=1 python benchmarks/memory_rules.py --steps 300
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from recall_learning import VOCAB as KV_VOCAB
from recall_learning import recall_rows
from titans.model import TitansConfig, TitansLM
from titans.ops.memory.rules import MEMORY_RULES
from titans.tasks.mqar import generate_mqar

TASKS = ("kv", "mqar")


def model_for(rule: str, vocab: int, args) -> TitansLM:
    cfg = TitansConfig.with_memory_rule(
        rule, variant="lmm", vocab_size=vocab, dim=args.dim, depth=2, heads=4, persistent_tokens=4,
        memory_chunk=args.chunk, memory_theta_activation="sigmoid", memory_max_lr=0.1, memory_theta_init=0.03,
        memory_eta_init=0.5, memory_alpha_init=1e-4, memory_zero_init_output=True, memory_associative_init=True,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return TitansLM(cfg)


def non_embedding_params(model: TitansLM) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)


class Task:
    """Rows of one task: ``batch(rng, n) -> (ids [n, T + 1], weight [n, T])`` and the held-out
    accuracy of a model's logits."""

    def __init__(self, name: str, args) -> None:
        self.name, self.args = name, args
        self.vocab = KV_VOCAB if name == "kv" else args.mqar_vocab
        self.held_out = self.batch(np.random.default_rng(10_000 + args.seed), 32)

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        if self.name == "kv":
            ids, answer = recall_rows(rng, n, a.length, a.pairs)
            weight = 1.0 + (a.answer_weight - 1.0) * answer[:, 1:].float()
            return ids, weight
        ids, labels = generate_mqar(n, vocab_size=self.vocab, seq_len=a.length + 1, num_pairs=a.pairs,
                                    seed=[a.seed, int(rng.integers(2**31))])  # fmt: skip
        return ids, (labels[:, 1:] != -100).float()

    def accuracy(self, model: TitansLM) -> float:
        ids, weight = self.held_out
        with torch.no_grad():
            logits, _, _ = model(ids[:, :-1])
        mask = weight > (1.0 if self.name == "kv" else 0.0)  # the answers (kv), the queried values (mqar)
        return (logits.argmax(-1) == ids[:, 1:])[mask].float().mean().item()


def train(rule: str, task: Task, args) -> dict:
    model = model_for(rule, task.vocab, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    curve, seconds = [], 0.0
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50)  # 50 warm-up steps
        ids, weight = task.batch(rng, args.batch)
        start = time.perf_counter()
        logits, _, _ = model(ids[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (ce * weight.flatten()).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seconds += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, task.accuracy(model)))
            print(f"  {task.name:>4} {rule:>8}  step {step:>5}  accuracy {curve[-1][1]:6.1%}", flush=True)
    tokens = args.steps * args.batch * args.length
    return {"curve": curve, "params": non_embedding_params(model), "tok_s": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rules", nargs="+", default=list(MEMORY_RULES), choices=list(MEMORY_RULES))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--steps", type=int, default=300, help="training steps per rule and task")
    p.add_argument("--length", type=int, default=256, help="tokens per row")
    p.add_argument("--pairs", type=int, default=20, help="key-value pairs per row")
    p.add_argument("--mqar-vocab", type=int, default=512, help="MQAR vocabulary (keys below half, values above)")
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--chunk", type=int, default=4, help="memory chunk size")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--answer-weight", type=float, default=10.0, help="kv: loss weight of answer tokens")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed of model and data")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    if min(args.steps, args.length, args.pairs, args.batch, args.eval_every, args.threads) < 1:
        p.error("--steps, --length, --pairs, --batch, --eval-every and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    for name in args.tasks:
        task = Task(name, args)
        results = {rule: train(rule, task, args) for rule in args.rules}
        steps = [s for s, _ in next(iter(results.values()))["curve"]]
        print(f"\n{name}: held-out accuracy (32 rows of {args.length} tokens, {args.pairs} pairs; "
              f"chance {1 / (200 if name == 'kv' else args.mqar_vocab // 2):.1%}), LMM of width {args.dim}, "
              f"seed {args.seed}, {torch.get_num_threads()} thread(s)")  # fmt: skip
        print("| rule | params (non-embedding) | " + " | ".join(f"step {s}" for s in steps) + " | train tok/s |")
        print("|---|---|" + "---|" * (len(steps) + 1))
        for rule, r in results.items():
            accs = " | ".join(f"{a:.1%}" for _, a in r["curve"])
            print(f"| {rule} | {r['params']:,} | {accs} | {r['tok_s']:,.0f} |")


if __name__ == "__main__":
    main()
