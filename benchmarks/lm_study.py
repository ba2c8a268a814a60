"""Does the memory help a language model? The paper's Table 1, Table 5 and Figure 7 at this
machine's scale, run as resumable pieces.

Every model of a preset has the same non-embedding parameter count (within 5%: the feed-forward
width of each variant is chosen to match the MAC's), reads the same rows in the same order (one
data seed) for the same number of tokens, with one optimiser recipe. Data: the built-in corpus
(Wikipedia lead sections + Shakespeare) with whole documents held out (four plays, 2% of the
leads), a BPE trained on the rest. Each finished piece writes ``docs/lm_study/<preset>/<piece>.json``
(committed); checkpoints and prepared data stay in ``runs/lm_study/<preset>/``.

    python benchmarks/lm_study.py plan                  # pieces, parameter counts, budget arithmetic
    python benchmarks/lm_study.py measure               # training tokens/s of each main-table model
    python benchmarks/lm_study.py run --hours 2.5       # train + evaluate the next unfinished pieces
    python benchmarks/lm_study.py run --only mac mag    # just these pieces
    python benchmarks/lm_study.py report                # docs/lm_study.md's tables and plots

A run interrupted (``--hours`` spent, Ctrl-C, a killed session) keeps its checkpoint and continues
from it next time. ``--preset gpu`` is the same study at a size for one GPU; ``--device cuda``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _measure import machine_name  # noqa: E402  (benchmarks/: this script's folder)
from titans.model import TitansConfig, TitansLM  # noqa: E402

MAIN = ("transformer", "swa", "mac", "mag", "mal", "lmm")
MEMORY = ("mac", "mag", "mal", "lmm")
BUCKETS = (0, 256, 1024, 4096, 16384)
ZEROSHOT_LIMIT = 200  # examples per zero-shot task
VAL_FRACTION = 0.05  # of the training documents, for the validation loss during training


@dataclass(frozen=True)
class Preset:
    """One size of the study. ``tokens``: training tokens of every run (a learning-rate trial reads
    a quarter of them)."""

    dim: int
    depth: int
    heads: int
    window: int  # SWA / MAG / MAL window and MAC segment: well below seq_len
    vocab: int  # BPE vocabulary
    seq_len: int  # tokens a training row holds
    rows: int  # rows per step
    tokens: int
    lrs: tuple[float, ...]  # the learning rates tried on the Transformer++ and on the MAC
    warmup_steps: int
    held_out_plays: int
    held_out_wiki: float  # fraction of the Wikipedia leads held out
    memory: dict = field(default_factory=dict)  # TitansConfig settings of every memory model

    def steps(self, tokens: int) -> int:
        return max(1, tokens // (self.rows * (self.seq_len - 1)))


# Every memory model bounds each inner step (memory_max_grad_norm): untrained memories of this size
# diverge within the first thousand tokens of a row without it (docs/reliability.md). And its
# learning rate (theta) is bounded by a sigmoid at max_lr: a 64-token chunk takes every gradient at
# its start weights and momentum re-applies them, so one chunk moves the memory by up to
# chunk * max_lr / (1 - eta) clipped gradients, and with a larger bound the outer gradient through
# that recurrence explodes (docs/lm_study.md, "Stability").
BOUNDED = {"memory_max_grad_norm": 10.0, "memory_theta_activation": "sigmoid", "memory_max_lr": 0.01}
PRESETS = {
    "cpu": Preset(dim=128, depth=4, heads=4, window=128, vocab=8192, seq_len=2048, rows=4, tokens=2_000_000,
                  lrs=(5e-4, 1e-3, 2e-3), warmup_steps=25, held_out_plays=4, held_out_wiki=0.02,
                  memory={"memory_chunk": 64, **BOUNDED}),
    "smoke": Preset(dim=32, depth=1, heads=2, window=64, vocab=8192, seq_len=256, rows=2, tokens=20_000,
                    lrs=(1e-3, 2e-3), warmup_steps=2, held_out_plays=4, held_out_wiki=0.02,
                    memory={"memory_chunk": 16, **BOUNDED}),  # a pipeline check, not a result
    "gpu": Preset(dim=768, depth=12, heads=12, window=512, vocab=32000, seq_len=4096, rows=32, tokens=2_000_000_000,
                  lrs=(2e-4, 4e-4, 8e-4), warmup_steps=1000, held_out_plays=4, held_out_wiki=0.02,
                  memory={"memory_chunk": 64, **BOUNDED}),
}  # fmt: skip


@dataclass(frozen=True)
class Piece:
    name: str
    group: str  # tune | main | seed | rules | ablation | depth
    variant: str
    model: dict  # TitansConfig fields
    lr: float
    tokens: int
    seed: int = 0  # weights and data order


def _base_model(preset: Preset, variant: str) -> dict:
    cfg = dict(variant=variant, vocab_size=preset.vocab, dim=preset.dim, depth=preset.depth, heads=preset.heads,
               window=preset.window, segment=preset.window)  # fmt: skip
    if variant in MEMORY:
        cfg.update(preset.memory)
    return cfg


def non_embedding_params(model_cfg: dict) -> int:
    """Parameters outside the (tied) embedding, counted on the meta device."""
    with torch.device("meta"):
        model = TitansLM(TitansConfig(**model_cfg))
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed."))


def matched_ffn(preset: Preset, variant: str, target: int) -> float:
    """The feed-forward multiplier whose model is closest to ``target`` non-embedding parameters."""
    key = json.dumps([_base_model(preset, variant), target], sort_keys=True)
    if key not in _MATCHED:  # 126 model builds: once per process, not once per call of pieces()
        candidates = [4.0] + [m / 8 for m in range(4, 129)]  # the default first: it wins a tie
        base = _base_model(preset, variant)
        _MATCHED[key] = min(candidates, key=lambda m: abs(non_embedding_params({**base, "ffn_mult": m}) - target))
    return _MATCHED[key]


_MATCHED: dict[str, float] = {}


def family(variant: str) -> str:
    """Whose tuned learning rate a variant trains with: the MAC's (memory models) or the Transformer++'s."""
    return "mac" if variant in MEMORY else "transformer"


def pieces(preset: Preset, results: Path, preview: bool = False) -> list[Piece]:
    """Every piece in running order, as far as the finished ones decide it: the main table waits
    for the learning-rate trials, the rules / ablation / depth pieces for the main table (they run on
    its memory variant of lowest held-out perplexity). ``preview``: list them all anyway, with the
    middle learning rate and the MAC standing in for what is not decided yet."""
    target = non_embedding_params(_base_model(preset, "mac"))
    models = {v: {**_base_model(preset, v), "ffn_mult": matched_ffn(preset, v, target)} for v in MAIN}
    trial = preset.tokens // 4
    out = []
    for v in ("transformer", "mac"):
        tried = list(preset.lrs)
        while True:  # a best rate at the edge of the grid is not a tuned rate: try one step beyond it
            out_v = [Piece(f"tune-{v}-lr{lr:g}", "tune", v, models[v], lr, trial) for lr in tried]
            best = tuned_lrs(out_v, results)
            if best is None or len(tried) >= len(preset.lrs) + 3 or min(tried) < best[v] < max(tried):
                break
            tried.append(max(tried) * 2 if best[v] == max(tried) else min(tried) / 2)
        out += out_v
    lrs = tuned_lrs(out, results)
    if lrs is None and preview:
        lrs = {"transformer": preset.lrs[len(preset.lrs) // 2], "mac": preset.lrs[len(preset.lrs) // 2]}
    if lrs is None:
        return out
    main = [Piece(v, "main", v, models[v], lrs[family(v)], preset.tokens) for v in MAIN]
    out += main + [Piece("mac-seed1", "seed", "mac", models["mac"], lrs["mac"], preset.tokens, seed=1)]
    best = best_memory_variant(results) or ("mac" if preview else None)
    if best is None:
        return out
    base, lr = models[best], lrs[family(best)]
    rules = {"lp3": {"memory_objective": "lp", "memory_objective_p": 3.0},
             "huber": {"memory_objective": "huber"},
             "retention-q4": {"memory_retention_q": 4.0},
             "omega4": {"memory_window": 4},
             "poly2": {"memory_feature_degree": 2}}  # fmt: skip  (poly2 has more parameters: reported)
    ablations = {"linear": {"memory_depth": 1}, "no-conv": {"memory_conv_kernel": 0},
                 "no-momentum": {"memory_momentum": False}, "no-decay": {"memory_forgetting": False},
                 "no-persistent": {"persistent_tokens": 0}}  # fmt: skip
    out += [Piece(f"{best}-{n}", "rules", best, {**base, **o}, lr, preset.tokens) for n, o in rules.items()]
    out += [Piece(f"{best}-{n}", "ablation", best, {**base, **o}, lr, preset.tokens) for n, o in ablations.items()]
    out += [Piece(f"{best}-depth{d}", "depth", best, {**base, "memory_depth": d}, lr, preset.tokens) for d in (3, 4)]
    return out


def tuned_lrs(trials: list[Piece], results: Path) -> dict[str, float] | None:
    """Per family, the trial learning rate of lowest final validation loss; None until all ran.
    (``pieces`` adds a trial beyond the grid while the best rate is at its edge.)"""
    best: dict[str, tuple[float, float]] = {}
    for t in trials:
        f = results / f"{t.name}.json"
        if not f.is_file():
            return None
        record = json.loads(f.read_text())
        loss = math.inf if record.get("diverged") else record["val_loss"]
        if loss is None or (not math.isfinite(loss) and not record.get("diverged")):
            raise SystemExit(f"{f} has no finite validation loss ({loss}): delete it and run the trial again")
        if t.variant not in best or loss < best[t.variant][0]:
            best[t.variant] = (loss, t.lr)
    return {v: lr for v, (_, lr) in best.items()}


# ---- data -------------------------------------------------------------------------------------


def _u(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def split_corpus(preset: Preset) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files) of the built-in corpus: whole documents, chosen by a hash of
    their names (the plays with the smallest hashes, and the leads whose hash is below the fraction)."""
    from titans.data.corpus import builtin_corpus

    corpus = builtin_corpus()
    plays = sorted((corpus / "shakespeare").glob("*.txt"), key=lambda p: _u(p.name))
    leads = sorted((corpus / "wikipedia").glob("*.txt"))
    held = plays[: preset.held_out_plays] + [p for p in leads if _u(p.name) < preset.held_out_wiki]
    train = sorted(set(plays[preset.held_out_plays :]) | {p for p in leads if _u(p.name) >= preset.held_out_wiki})
    return train, sorted(held)


def prepare_data(preset: Preset, work: Path) -> Path:
    """Shards of the training documents with a BPE trained on them (once; reused after)."""
    from titans.data import text

    import fcntl

    out = work.parent / f"data-bpe{preset.vocab}-plays{preset.held_out_plays}-wiki{preset.held_out_wiki:g}-val{VAL_FRACTION:g}"
    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:  # one process prepares, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").is_file():
            _prepare(preset, out)
    return out


def _prepare(preset: Preset, out: Path) -> None:
    from titans.data import text

    train, _ = split_corpus(preset)
    print(f"training a {preset.vocab}-token BPE on {len(train)} documents and tokenising them into {out}")
    # the val split (documents of the training sources, for the learning-rate trials and the loss
    # curves) must hold every evaluation batch: 8 x 4 rows
    tokenizer = text.train_bpe_on_corpus(train, preset.vocab, val_fraction=VAL_FRACTION)
    text.prepare(train, out, tokenizer, overwrite=True, progress=False, val_fraction=VAL_FRACTION)


# ---- one piece ---------------------------------------------------------------------------------


def run_config(preset: Preset, piece: Piece, work: Path, data_dir: Path, device: str) -> dict:
    steps = preset.steps(piece.tokens)
    return {
        "model": piece.model,
        "train": {
            "out_dir": str(work / "runs" / piece.name), "seed": piece.seed, "seq_len": preset.seq_len - 1,
            "batch_tokens": preset.rows * (preset.seq_len - 1), "micro_batch": min(preset.rows, 2),
            "max_steps": steps, "lr": piece.lr, "warmup_steps": min(preset.warmup_steps, steps // 4),
            "eval_every": max(1, steps // 8), "eval_batches": 8, "eval_rows": 4,
            "checkpoint_every": max(1, steps // 20), "keep_checkpoints": 2, "log_every": 5, "device": device,
            "progress": False,
        },
        "data": {"kind": "text", "path": str(data_dir), "tokenizer": f"bpe:{preset.vocab}"},
    }  # fmt: skip


def _peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _run(cmd: list[str], deadline: float | None, log: Path) -> tuple[int, int | None]:
    """Run ``cmd`` (output to ``log``) until it ends or ``deadline`` passes (then SIGTERM: the
    trainer checkpoints and exits). Returns (exit code, peak resident bytes, Linux only)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak = None
        try:
            while proc.poll() is None:
                peak = max(filter(None, (peak, _peak_rss(proc.pid))), default=None)
                if deadline is not None and time.time() > deadline:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
                    break
                time.sleep(2)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    return proc.returncode, peak


def _finished(run_dir: Path, steps: int) -> bool:
    from titans.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return latest is not None and int(latest.name.removeprefix("step-")) >= steps


def _metrics(run_dir: Path) -> list[dict]:
    from titans.train.records import read_jsonl

    return read_jsonl(run_dir / "metrics.jsonl")[0]


def run_piece(preset: Preset, piece: Piece, work: Path, results: Path, device: str, deadline: float | None) -> bool:
    """Train, then evaluate one piece (a learning-rate trial only trains); True when its result
    file is written."""
    import yaml

    from titans.train.checkpoint import latest_checkpoint

    data_dir = prepare_data(preset, work)
    run_dir = work / "runs" / piece.name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir.parent / f"{piece.name}.yaml"
    config.write_text(yaml.safe_dump(run_config(preset, piece, work, data_dir, device), sort_keys=False))
    log = run_dir.parent / f"{piece.name}.log"
    titans = [sys.executable, "-m", "titans"]
    steps = preset.steps(piece.tokens)
    peak_file = run_dir / "peak_rss.json"  # the largest over the sessions a run took
    if not _finished(run_dir, steps):
        resume = ["--resume", "auto"] if latest_checkpoint(run_dir) is not None else []
        print(f"[{piece.name}] training {steps} steps ({log})", flush=True)
        code, peak = _run([*titans, "train", "--config", str(config), *resume], deadline, log)
        before = json.loads(peak_file.read_text())["bytes"] if peak_file.is_file() else None
        peak_file.write_text(json.dumps({"bytes": max(filter(None, (before, peak)), default=None)}))
        if not _finished(run_dir, steps):
            text = log.read_text(errors="replace")[-4000:]
            if piece.group == "tune" and ("FloatingPointError" in text or "non-finite" in text):
                # a learning rate that diverges is a finished trial, ranked last: resuming would diverge again
                print(f"[{piece.name}] diverged: recorded with val_loss inf", flush=True)
                results.mkdir(parents=True, exist_ok=True)
                (results / f"{piece.name}.json").write_text(json.dumps({
                    "piece": piece.name, "group": piece.group, "variant": piece.variant, "lr": piece.lr,
                    "val_loss": math.inf, "diverged": True, "machine": machine_name(device)}, indent=1))  # fmt: skip
                return True
            print(f"[{piece.name}] stopped before the end (exit {code}); it resumes next time", flush=True)
            return False
    metrics = _metrics(run_dir)
    vals = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
    speeds = sorted(m["tokens_per_s"] for m in metrics if "tokens_per_s" in m and "val_loss" not in m)
    record = {
        "piece": piece.name, "group": piece.group, "variant": piece.variant, "model": piece.model, "lr": piece.lr,
        "seed": piece.seed, "non_embedding_params": non_embedding_params(piece.model),
        "train_tokens": steps * preset.rows * (preset.seq_len - 1), "val_loss": vals[-1] if vals else None,
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
        "peak_rss_bytes": json.loads(peak_file.read_text())["bytes"] if peak_file.is_file() else None,
        "curve": [{k: m[k] for k in ("step", "tokens", "loss", "val_loss") if k in m} for m in metrics],
        "machine": machine_name(device),
    }  # fmt: skip
    if piece.group != "tune":
        _, held = split_corpus(preset)
        record["eval"] = {}
        for task, extra in (
            ("ppl", ["--text", *map(str, held), "--bucket-edges", ",".join(map(str, BUCKETS))]),
            ("zeroshot", ["--limit", str(ZEROSHOT_LIMIT)]),
        ):
            out = run_dir.parent / f"{piece.name}-{task}"
            print(f"[{piece.name}] eval {task}", flush=True)
            code, _ = _run([*titans, "eval", task, "--checkpoint", str(run_dir), "--device", device, "--no-progress",
                            "--out", str(out), *extra], deadline, log)  # fmt: skip
            if code != 0:
                print(f"[{piece.name}] eval {task} did not finish (exit {code}, see {log})", flush=True)
                return False
            rows = json.loads((out / "results.json").read_text())["rows"]
            record["eval"][task] = [{k: v for k, v in row.items() if k != "source"} for row in rows]
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{piece.name}.json").write_text(json.dumps(record, indent=1))
    print(f"[{piece.name}] done -> {results / (piece.name + '.json')}", flush=True)
    return True


def best_memory_variant(results: Path) -> str | None:
    """The memory variant of lowest held-out perplexity once every main-table piece is done."""
    scores = {}
    for v in MAIN:
        f = results / f"{v}.json"
        if not f.is_file():
            return None
        if v in MEMORY:
            scores[v] = held_out_ppl(json.loads(f.read_text()))
    return min(scores, key=scores.get)


def held_out_ppl(record: dict) -> float:
    return float(next(r["ppl"] for r in record["eval"]["ppl"] if r["kind"] == "overall"))


# ---- commands ----------------------------------------------------------------------------------


def cmd_plan(preset: Preset, results: Path) -> None:
    listed = pieces(preset, results, preview=True)
    print(f"rows of {preset.seq_len} tokens, {preset.rows} a step; {preset.tokens:,} training tokens a piece "
          f"({preset.steps(preset.tokens)} steps), a quarter for a learning-rate trial")  # fmt: skip
    print(f"{'piece':28s} {'group':9s} {'non-emb params':>15s} {'ffn_mult':>8s} {'lr':>7s} done")
    for p in listed:
        done = (results / f"{p.name}.json").is_file()
        print(f"{p.name:28s} {p.group:9s} {non_embedding_params(p.model):15,d} {p.model['ffn_mult']:8.3f} {p.lr:7.0e} {done}")
    if len(listed) > len(pieces(preset, results)):
        print("(undecided yet: the main table's learning rates, and which memory variant the rules, ablations "
              "and depths run on; shown as the middle rate and the MAC)")  # fmt: skip
    speeds = results / "throughput.json"
    if speeds.is_file():
        measured = json.loads(speeds.read_text())["tokens_per_s"]
        seconds = [p.tokens / measured[p.variant] for p in listed]
        print(f"budget: {sum(seconds) / 3600:.1f} CPU-hours of training at the measured one-thread speeds "
              f"(+ about 5 minutes of evaluation a piece)")  # fmt: skip


def cmd_measure(preset: Preset, results: Path, steps: int) -> None:
    """Forward + backward + AdamW step on random rows, one thread per model, median of ``steps``."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    speeds = {}
    for v in MAIN:
        p = next(p for p in pieces(preset, results, preview=True) if p.variant == v)
        torch.manual_seed(0)
        model = TitansLM(TitansConfig(**p.model))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        micro = min(preset.rows, 2)
        ids = torch.randint(0, preset.vocab, (micro, preset.seq_len))
        times = []
        for _ in range(steps + 1):  # the first step warms up
            t = time.perf_counter()
            _, loss, _ = model(ids, labels=ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        tps = micro * preset.seq_len / sorted(times[1:])[len(times[1:]) // 2]
        speeds[v] = tps
        print(f"{v:12s} {non_embedding_params(p.model):12,d} params  {tps:8.0f} tokens/s", flush=True)
    results.mkdir(parents=True, exist_ok=True)
    (results / "throughput.json").write_text(json.dumps({"tokens_per_s": speeds, "machine": machine_name("cpu"),
                                                         "threads": torch.get_num_threads()}, indent=1))  # fmt: skip


def _claim(work: Path, piece: Piece) -> bool:
    """Take ``piece`` for this process (a file holding its PID, created exclusively), unless a
    living process holds it: several ``run`` processes then share the pieces."""
    claims = work / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / piece.name
    mine = claims / f".{piece.name}.{os.getpid()}"
    mine.write_text(str(os.getpid()))  # complete before it becomes the claim: others never read it half-written
    try:
        os.link(mine, path)  # atomic: exactly one process creates the claim
        return True
    except FileExistsError:
        try:
            os.kill(int(path.read_text()), 0)
            return False  # its process is alive
        except PermissionError:
            return False  # alive, another user's
        except (ValueError, ProcessLookupError, OSError):
            path.unlink(missing_ok=True)  # left by a process that is gone
            return _claim(work, piece)
    finally:
        mine.unlink(missing_ok=True)


def cmd_run(preset: Preset, work: Path, results: Path, device: str, hours: float | None, only: list[str] | None) -> None:
    """Run unfinished pieces in order until none is left or ``hours`` are spent. Start two of
    these (one per core) to run two pieces side by side: each takes the next piece nobody holds,
    and waits when the rest wait for pieces the other is running."""
    deadline = None if hours is None else time.time() + 3600 * hours
    while True:
        todo = [p for p in pieces(preset, results) if not (results / f"{p.name}.json").is_file()]
        if only:
            todo = [p for p in todo if p.name in only]
        if not todo:
            print("nothing left to run" if not only else "the named pieces are done (or wait for earlier ones)")
            return
        if deadline is not None and time.time() > deadline:
            print(f"time is up; next: {', '.join(p.name for p in todo)}")
            return
        piece = next((p for p in todo if _claim(work, p)), None)
        if piece is None:  # every piece left is another process's, or waits for one of those
            time.sleep(30)
            continue
        try:
            finished = run_piece(preset, piece, work, results, device, deadline)
        finally:
            (work / "claims" / piece.name).unlink(missing_ok=True)
        if not finished:
            return


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _buckets(record: dict) -> dict[str, float]:
    out = {}
    for r in record["eval"]["ppl"]:
        if r["kind"] == "bucket":
            end = "+" if r["end"] is None else f"-{_k(r['end'])}"
            out[f"{_k(r['start'])}{end}"] = r["ppl"]
    return out


def _k(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def cmd_report(name: str, preset: Preset, results: Path) -> None:
    """``docs/lm_study/<preset>/README.md``: the tables of the finished pieces, and plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {f.stem: json.loads(f.read_text()) for f in sorted(results.glob("*.json"))
               if f.stem not in ("throughput", "data")}  # fmt: skip
    done = [p for p in pieces(preset, results) if p.name in records]
    if not done:
        raise SystemExit(f"no finished pieces in {results}: run `python benchmarks/lm_study.py run` first")
    out = [f"# Language-model study, preset `{name}`", "",
           f"Written by `python benchmarks/lm_study.py report --preset {name}` from the pieces in this folder "
           f"(each `<piece>.json` says the machine it ran on). {len(done)} of "
           f"{len(pieces(preset, results, preview=True))} pieces done.", ""]  # fmt: skip
    tune = [records[p.name] for p in done if p.group == "tune"]
    if tune:
        out += ["## Learning-rate trials (a quarter of the tokens; validation loss)", "",
                _table(["model", "lr", "val loss"], [[r["variant"], f"{r['lr']:g}", f"{r['val_loss']:.4f}"] for r in tune]), ""]  # fmt: skip
    evaluated = [records[p.name] for p in done if p.group != "tune"]
    if evaluated:
        buckets = list(_buckets(evaluated[0]))
        rows = []
        for r in evaluated:
            b = _buckets(r)
            zs = {z["task"]: z["value"] for z in r["eval"]["zeroshot"]}
            rows.append([r["piece"], r["group"], f"{r['non_embedding_params']:,}", f"{r['lr']:g}",
                         f"{held_out_ppl(r):.2f}", *(f"{b[k]:.2f}" for k in buckets),
                         f"{zs.get('avg', float('nan')):.1f}",
                         "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}",
                         "-" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.0f}"])  # fmt: skip
        out += ["## Held-out perplexity (whole documents streamed), by position; zero-shot average; speed", "",
                _table(["piece", "group", "non-emb params", "lr", "ppl", *(f"ppl {k}" for k in buckets),
                        "zero-shot avg %", "train tok/s", "peak MiB"], rows), ""]  # fmt: skip
        tasks = [z["task"] for z in evaluated[0]["eval"]["zeroshot"]]
        out += ["## Zero-shot (Table 1 layout; 200 examples a task, LAMBADA: acc)", "",
                _table(["piece", *tasks], [[r["piece"], *(f"{z['value']:.1f}" for z in r["eval"]["zeroshot"])]
                                          for r in evaluated]), ""]  # fmt: skip
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for r in evaluated:
            curve = [c for c in r["curve"] if "loss" in c]
            ax[0].plot([c["tokens"] for c in curve], [c["loss"] for c in curve], label=r["piece"], lw=1)
            b = _buckets(r)
            ax[1].plot(range(len(b)), list(b.values()), marker="o", label=r["piece"])
        ax[0].set(xlabel="training tokens", ylabel="training loss", title="loss curves")
        ax[1].set(xticks=range(len(buckets)), xticklabels=buckets, xlabel="position in document",
                  ylabel="held-out perplexity", title="perplexity by position", yscale="log")  # fmt: skip
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results / "curves.png", dpi=110)
        out += ["![loss curves and perplexity by position](curves.png)", ""]
    (results / "README.md").write_text("\n".join(out))
    print(f"wrote {results / 'README.md'} and {results / 'curves.png'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("plan", "measure", "run", "report"))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hours", type=float, default=None, help="run: stop (with checkpoints) after this long")
    ap.add_argument("--only", nargs="+", help="run: only these pieces")
    ap.add_argument("--steps", type=int, default=5, help="measure: timed steps per model")
    args = ap.parse_args(argv)
    if args.hours is not None and not (math.isfinite(args.hours) and args.hours > 0):
        ap.error(f"--hours must be a positive number, got {args.hours}")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    preset = PRESETS[args.preset]
    work = ROOT / "runs" / "lm_study" / args.preset
    results = ROOT / "docs" / "lm_study" / args.preset
    if args.command == "plan":
        cmd_plan(preset, results)
    elif args.command == "measure":
        cmd_measure(preset, results, args.steps)
    elif args.command == "run":
        known = {p.name for p in pieces(preset, results, preview=True)}
        known |= {p.name.replace("mac-", f"{v}-", 1) for v in MEMORY for p in pieces(preset, results, preview=True)}
        unknown = sorted(set(args.only or ()) - known)
        if unknown:
            ap.error(f"unknown piece(s) {unknown}; `plan` lists them")
        cmd_run(preset, work, results, args.device, args.hours, args.only)
    else:
        cmd_report(args.preset, preset, results)


if __name__ == "__main__":
    main()
