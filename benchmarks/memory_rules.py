"""Which memory rule learns to recall? Every named rule on the same model, data and budget.

Each rule of ``titans.ops.memory.rules`` (``--rules``; default: all of them but ``atlas``, whose exact
Muon chunks cost about a hundred times a Titans step: its run would take days here; name it to run
it) becomes the memory of the same LMM (``TitansConfig.with_memory_rule``: the memory alone, so the
rule decides), trained with AdamW from the same seed on the same rows, on two tasks:

- ``kv``: key-value recall beyond any window (``recall_learning.py``'s rows: needles
  ``[NEEDLE, key, value]`` in the first half of a row, their questions in shuffled order in the
  second; every token scored, answers ``--answer-weight`` times as much); accuracy of the answers;
- ``mqar``: Zoology's multi-query associative recall (``titans.tasks.mqar``: pairs first, queries
  later at power-law gaps, random filler); accuracy of the queried values (the only targets).

It prints held-out accuracy every ``--eval-every`` steps, the parameter count (non-embedding) and
the training speed of each rule, as one table per task; then, on the trained models, accuracy on
held-out rows of other settings: ``kv`` at longer rows (``--kv-lengths``: the same pairs spread
over up to 16K tokens, needles thousands of tokens before their questions), ``mqar`` at other
numbers of pairs and lengths (``--mqar-pairs`` x ``--mqar-lengths``, Zoology's axes). Speed and
memory of each rule's layer at T=4K: ``memory_throughput.py --rules``.

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
    # M_0's output at zero (the memory answers only what was written), except under Memora's
    # retention, whose weights are softmax rows and cannot answer zero
    zero_output = MEMORY_RULES[rule].settings.get("retention_kl") is None
    cfg = TitansConfig.with_memory_rule(
        rule, variant="lmm", vocab_size=vocab, dim=args.dim, depth=2, heads=4, persistent_tokens=4,
        memory_chunk=args.chunk, memory_theta_activation="sigmoid", memory_max_lr=0.1, memory_theta_init=0.03,
        memory_eta_init=0.5, memory_alpha_init=1e-4, memory_zero_init_output=zero_output,
        memory_associative_init=True,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return TitansLM(cfg)


def non_embedding_params(model: TitansLM) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)


class Task:
    """Rows of one task: ``batch(rng, n, length, pairs) -> (inputs [n, length], targets [n, length],
    weight [n, length])`` (weight: the loss weight of each target; the scored targets are those
    above ``scored``)."""

    def __init__(self, name: str, args) -> None:
        self.name, self.args = name, args
        self.vocab = KV_VOCAB if name == "kv" else args.mqar_vocab
        self.scored = 1.0 if name == "kv" else 0.0  # kv: the answers; mqar: the queried values

    def batch(self, rng: np.random.Generator, n: int, length: int, pairs: int):
        if self.name == "kv":
            ids, answer = recall_rows(rng, n, length, pairs)
            return ids[:, :-1], ids[:, 1:], 1.0 + (self.args.answer_weight - 1.0) * answer[:, 1:].float()
        ids, labels = generate_mqar(n, vocab_size=self.vocab, seq_len=length + 1, num_pairs=pairs,
                                    seed=[self.args.seed, int(rng.integers(2**31))])  # fmt: skip
        # MQAR's targets are its labels (the value after each queried key), not the next input:
        # the input there is filler, as in Zoology
        scored = labels[:, 1:] != -100
        return ids[:, :-1], torch.where(scored, labels[:, 1:], 0), scored.float()

    def accuracy(self, model: TitansLM, length: int, pairs: int, rows: int = 32) -> float:
        """Accuracy on ``rows`` held-out rows (the same rows for every rule and step)."""
        inputs, targets, weight = self.batch(np.random.default_rng([10_000, self.args.seed, length, pairs]), rows,
                                             length, pairs)  # fmt: skip
        with torch.no_grad():
            logits, _, _ = model(inputs)
        mask = weight > self.scored
        return (logits.argmax(-1) == targets)[mask].float().mean().item()


def train(rule: str, task: Task, args) -> dict:
    model = model_for(rule, task.vocab, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    curve, seconds = [], 0.0
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50)  # 50 warm-up steps
        inputs, targets, weight = task.batch(rng, args.batch, args.length, args.pairs)
        start = time.perf_counter()
        logits, _, _ = model(inputs)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (ce * weight.flatten()).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seconds += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, task.accuracy(model, args.length, args.pairs)))
            print(f"  {task.name:>4} {rule:>8}  step {step:>5}  accuracy {curve[-1][1]:6.1%}", flush=True)
    tokens = args.steps * args.batch * args.length
    if task.name == "kv":  # the same pairs, spread over longer rows
        beyond = {(n, args.pairs): task.accuracy(model, n, args.pairs, rows=8) for n in args.kv_lengths}
    else:
        beyond = {(n, k): task.accuracy(model, n, k) for n in args.mqar_lengths for k in args.mqar_pairs}
    return {"curve": curve, "params": non_embedding_params(model), "tok_s": tokens / seconds, "beyond": beyond}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rules", nargs="+", default=[r for r in MEMORY_RULES if r != "atlas"], choices=list(MEMORY_RULES))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--steps", type=int, default=300, help="training steps per rule and task")
    p.add_argument("--length", type=int, default=256, help="tokens per row")
    p.add_argument("--pairs", type=int, default=20, help="key-value pairs per row")
    p.add_argument("--mqar-vocab", type=int, default=512, help="MQAR vocabulary (keys below half, values above)")
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--kv-lengths", type=int, nargs="+", default=[1024, 4096, 16384],
                   help="kv: held-out row lengths after training (the same pairs)")
    p.add_argument("--mqar-lengths", type=int, nargs="+", default=[128, 256, 512], help="mqar: held-out lengths")
    p.add_argument("--mqar-pairs", type=int, nargs="+", default=[8, 16, 32], help="mqar: held-out pairs")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--chunk", type=int, default=4, help="memory chunk size")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--answer-weight", type=float, default=10.0, help="kv: loss weight of answer tokens")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed of model and data")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    sizes = (args.steps, args.length, args.pairs, args.batch, args.eval_every, args.threads, *args.kv_lengths,
             *args.mqar_lengths, *args.mqar_pairs)  # fmt: skip
    if min(sizes) < 1:
        p.error("steps, lengths, pairs, batch, eval interval and threads must be >= 1")
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
        settings = list(next(iter(results.values()))["beyond"])
        label = (lambda n, k: f"{n} tokens") if name == "kv" else (lambda n, k: f"{k} pairs, {n}")
        print(f"\n{name}: the trained models on held-out rows of other settings")
        print("| rule | " + " | ".join(label(n, k) for n, k in settings) + " |")
        print("|---|" + "---|" * len(settings))
        for rule, r in results.items():
            print(f"| {rule} | " + " | ".join(f"{r['beyond'][x]:.1%}" for x in settings) + " |")


if __name__ == "__main__":
    main()
