"""``titans demo niah``: several needles with different keys written into book text and noise,
one of them asked for by its key, from 1K to 16K tokens (``--lengths`` for more), streamed through
a Titans model and a sliding-window baseline with their state in constant memory.

The default test is RULER's multi-key needle test: ``mk-n``, four needles in Shakespeare, and
``mk-pk``, four in RULER's noise; a model that answers the latest needle, or any needle, scores
about a quarter at best, and the sliding window only sees needles inside its 64 tokens. The models
are the package's shipped checkpoints (``titans/checkpoints/<name>/``: weights, the run config, and
the exact command, seed and data that produced them), trained by the recipes in
``titans/recipes/``; ``--retrain`` trains them again from those recipes and replaces them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import UserError
from ..io.config_files import check_range

__all__ = ["DEMO_MODELS", "shipped_checkpoint", "retrain", "run_demo"]

PACKAGE = Path(__file__).parents[1]  # titans/, where the recipes and checkpoints ship
CHECKPOINTS = PACKAGE / "checkpoints"
RECIPES = PACKAGE / "recipes"
# demo name -> recipe / checkpoint name: a MAG Titans (sliding-window attention, window 64, gated
# with the neural memory) trained to retrieve by key (titans/recipes/recall-mag-*.yaml), and the
# sliding-window transformer (window 64) as the baseline.
DEMO_MODELS = {
    "titans-mag": "recall-mag-4",
    "swa": "niah-pair-swa",
}
# Longest context a model runs at in the demo (none yet: every demo model's state is of constant
# size); a model whose state grows with the context (Transformer++'s KV cache) stops here.
MAX_LENGTH: dict[str, int] = {}
# Test-time settings a shipped checkpoint runs with instead of its recipe's (recorded in its
# provenance; none at present).
INFERENCE_SETTINGS: dict[str, dict] = {}
DEFAULT_VARIANTS = ("mk-n", "mk-pk")
DEFAULT_LENGTHS = (1024, 4096, 16384)
DEFAULT_SAMPLES = 16  # prompts per length: the asked needle at 16 evenly spaced depths
DEFAULT_NEEDLES = 4  # needles per multi-key prompt
NIAH_TITLES = {
    "pair-pk": "One pair needle in noise (PAIR-NIAH-PK)",
    "mk-n": "Needles in Shakespeare, one asked by its key (MK-NIAH-N)",
    "mk-pk": "Needles in noise, one asked by its key (MK-NIAH-PK)",
}


def shipped_checkpoint(name: str, root: Path = CHECKPOINTS) -> Path:
    if name not in DEMO_MODELS:
        raise UserError(f"unknown demo model {name!r}; choose from {sorted(DEMO_MODELS)}")
    path = root / DEMO_MODELS[name]
    if not (path / "MANIFEST.json").is_file():
        raise UserError(
            f"no shipped checkpoint for {name} at {path}: train it with `titans demo niah --retrain` "
            f"(recipe {RECIPES / (DEMO_MODELS[name] + '.yaml')})"
        )
    return path


def retrain(
    names: list[str], work_dir: Path, root: Path = CHECKPOINTS, overrides: list[str] = (), recipes: Path = RECIPES
) -> None:
    """Train each model from its recipe (resuming an interrupted run in ``work_dir``) and export
    the result as the shipped checkpoint, recording the command and seed. A recipe whose
    ``train.init_from`` is ``recipe:NAME`` is a later curriculum stage: recipe NAME is trained
    first (into ``work_dir/NAME``, itself possibly a stage of another) and this one starts from it."""
    from ..train.checkpoint import export_for_inference

    for name in names:
        recipe, run, summary, stages = _train_recipe(DEMO_MODELS[name], work_dir, list(overrides), recipes)
        note = {
            "command": f"titans demo niah --retrain (recipe titans/recipes/{recipe.name})",
            "stages": stages, "overrides": list(overrides), "seed": run.train.seed, "data": run.data.kind,
            "data_options": run.data.options, "steps": summary["step"], "val_loss": summary["val_loss"],
        }  # fmt: skip
        export_for_inference(summary["checkpoint"], root / DEMO_MODELS[name], note=note,
                             model_settings=INFERENCE_SETTINGS.get(name))  # fmt: skip


def _train_recipe(recipe_name: str, work_dir: Path, overrides: list[str], recipes: Path, seen: tuple = ()):
    """Train recipe ``recipe_name`` (after the stage its ``init_from: recipe:NAME`` names) into
    ``work_dir/recipe_name``. Returns ``(recipe path, run, summary, [recipe names in order])``."""
    from ..io.config_files import load_config_file
    from ..train.config import load_run_config
    from ..train.trainer import train

    if recipe_name in seen:
        raise UserError(f"recipes {' -> '.join((*seen, recipe_name))} start from each other in a loop")
    recipe = recipes / f"{recipe_name}.yaml"
    if not recipe.is_file():
        raise UserError(f"no recipe {recipe}")
    out_dir = work_dir / recipe_name
    extra, stages = [f"train.out_dir={out_dir}"], []
    parent = (load_config_file(recipe).get("train") or {}).get("init_from")
    if isinstance(parent, str) and parent.startswith("recipe:"):
        parent = parent[len("recipe:"):]
        _, _, _, stages = _train_recipe(parent, work_dir, overrides, recipes, (*seen, recipe_name))
        extra.append(f"train.init_from={work_dir / parent}")
    run = load_run_config(str(recipe), [*extra, *overrides])
    print(f"training {recipe_name} from {recipe} into {out_dir}")
    summary = train(run, resume="auto")
    if summary["stopped"] not in ("max_steps", "stopped"):  # e.g. a max_minutes budget ran out
        raise UserError(f"recipe {recipe_name} ended early ({summary['stopped']} at step {summary['step']}): "
                        f"run --retrain again to continue it")  # fmt: skip
    return recipe, run, summary, [*stages, recipe_name]


def run_demo(
    models: list[str], lengths: list[int], samples: int, out_dir: Path, *, variants=DEFAULT_VARIANTS,
    needles: int | None = DEFAULT_NEEDLES, chunk_tokens: int = 4096, seed: int = 0, progress: bool = True,
    root: Path = CHECKPOINTS,
) -> dict:
    """Accuracy per model, variant and length over ``samples`` prompts at evenly spaced depths of
    the asked needle (``needles`` needles per prompt for the multi-key variants), a length's prompts
    streamed side by side as one batch; tokens/s counts every row's tokens; peak resident memory
    is sampled while each length streams. A model is not run beyond ``MAX_LENGTH`` (its state
    grows with the context). Writes a heatmap and results; returns one table per variant."""
    import json

    import torch

    from ..eval.niah import MULTI_KEY, plot_niah_heatmap, run_niah
    from ..eval.report import format_table, length_label
    from ..runtime.resident import PeakResident
    from ..train.checkpoint import load_pretrained

    torch.manual_seed(seed)
    rows, records = [], []
    for name in models:
        model, tokenizer, info = load_pretrained(shipped_checkpoint(name, root))
        for variant in variants:
            for length in lengths:
                if length > MAX_LENGTH.get(name, length):
                    continue
                with PeakResident() as peak:
                    start = time.perf_counter()
                    result = run_niah(
                        model, tokenizer, [length], [variant], samples=samples, depths=samples, seed=seed,
                        chunk_tokens=chunk_tokens, model_name=name, progress=progress, batch_size=samples,
                        bar_unit="token", needles=needles if variant in MULTI_KEY else None,
                    )  # fmt: skip
                    seconds = time.perf_counter() - start
                tokens = sum(r["prompt_tokens"] for r in result.records)
                records += result.records
                rows.append(dict(
                    model=name, variant=variant, length=length, samples=samples, accuracy=result.rows[0]["accuracy"],
                    distractor=result.rows[0].get("distractor"), tokens_per_s=tokens / seconds,
                    peak_rss_mb=peak.peak_mb, step=info["step"],
                ))  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    heatmap = plot_niah_heatmap(records, out_dir / "niah_heatmap.png", title="Needle retrieval, streamed")
    tables = []
    for variant in variants:
        columns = ["Model"] + [length_label(n) for n in lengths] + ["tokens/s", "peak MB"]
        body = []
        for name in models:
            mine = {r["length"]: r for r in rows if r["model"] == name and r["variant"] == variant}
            cells = [f"{mine[n]['accuracy']:.0f}%" if n in mine else "-" for n in lengths]
            speed = sum(r["tokens_per_s"] for r in mine.values()) / len(mine)
            body.append([name, *cells, f"{speed:,.0f}", f"{max(r['peak_rss_mb'] for r in mine.values()):,.0f}"])
        what = f"{needles} needles per prompt, the question asks one by its key" if variant in MULTI_KEY else "one needle"
        title = f"{NIAH_TITLES.get(variant, variant)}: accuracy, {samples} prompts per length ({what})"
        tables.append(format_table(columns, body, title=title))
    skipped = [f"{name} above {length_label(n)}" for name, n in MAX_LENGTH.items() if name in models and n < max(lengths)]
    note = f"-: not run ({', '.join(skipped)}: its state grows with the context)" if skipped else ""
    table = "\n\n".join(tables) + (f"\n{note}" if note else "")
    (out_dir / "demo_results.json").write_text(json.dumps({"rows": rows, "records": records}, indent=1))
    return {"table": table, "rows": rows, "heatmap": heatmap}


def main(args) -> int:
    from ..eval.report import EvalSettingError

    lengths = [int(x) for x in args.lengths]
    if any(n < 256 for n in lengths):
        raise UserError("--lengths must be at least 256 tokens (a RULER prompt needs room)")
    check_range("--samples", args.samples, 1, 10**6)
    check_range("--needles", args.needles, 1, 1000)
    check_range("--chunk-tokens", args.chunk_tokens, 1, 1 << 32)
    models = args.models or list(DEMO_MODELS)
    if args.retrain:
        retrain(models, Path(args.work_dir))
    try:
        result = run_demo(models, lengths, args.samples, Path(args.out), chunk_tokens=args.chunk_tokens,
                          variants=args.variants, needles=args.needles, progress=not args.no_progress)  # fmt: skip
    except EvalSettingError as err:  # the user's settings (a chunk size the model cannot stream, ...)
        raise UserError(str(err)) from None
    print(result["table"])
    print(f"heatmap: {result['heatmap']}")
    sys.stdout.flush()
    return 0
