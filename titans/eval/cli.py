"""``titans eval <task>``: run one evaluation on a checkpoint (or an untrained model), print the
table in the paper's layout and write ``results.json``, ``results.csv`` and plots into ``--out``.

    titans eval niah --checkpoint runs/tiny --lengths 1K,4K --variants pk,n,w --samples 20 --out eval/niah
    titans eval zeroshot --config micro-untrained --tasks piqa,boolq --limit 50
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..io.config_files import ConfigError, check_range, check_seed

__all__ = ["UNTRAINED", "load_model", "parse_lengths", "register", "run"]

# untrained model shapes for trying every command without a checkpoint (vocab from the tokenizer)
UNTRAINED = {
    "tiny-untrained": dict(preset="tiny"),
    "micro-untrained": dict(dim=32, depth=1, heads=2, segment=16, window=16, memory_chunk=8),
}


def parse_lengths(text: str) -> list[int]:
    """'1K,4096,1M' -> [1024, 4096, 1048576]."""
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(item[-1:], 1) if item else 1
        digits = item[:-1] if scale > 1 else item
        if not digits.isdigit() or int(digits) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 1024,4K,1M")
        if int(digits) * scale > MAX_LENGTH:
            raise argparse.ArgumentTypeError(f"{item}: longer than {MAX_LENGTH:,} tokens (4G), beyond any run here")
        out.append(int(digits) * scale)
    return out


def parse_edges(text: str) -> list[int]:
    """'0,256,1K,4K' -> [0, 256, 1024, 4096]: position bucket edges, from 0, increasing."""
    items = [t.strip() for t in text.split(",")]
    if items[0] != "0":
        raise argparse.ArgumentTypeError(f"{text!r}: bucket edges start at 0, e.g. 0,256,1K,4K")
    edges = [0, *parse_lengths(",".join(items[1:]))] if len(items) > 1 else [0]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise argparse.ArgumentTypeError(f"{text!r}: bucket edges must increase")
    return edges


MAX_LENGTH = 1 << 32  # tokens: beyond any stream worth reading, and far below where counts overflow


def parse_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


def _common(p: argparse.ArgumentParser, task: str) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", metavar="CK",
                     help="checkpoint or run directory written by titans train; several give one table row each")
    src.add_argument("--config", metavar="NAME|FILE",
                     help="evaluate an UNTRAINED model instead: " + ", ".join(UNTRAINED)
                     + ", or a YAML/TOML file with a 'model' section of TitansConfig fields")  # fmt: skip
    p.add_argument("--variant", type=parse_names, default=None,
                   help="model variant(s) for --config: mac,mag,mal,lmm,transformer,swa (one row each; default mac)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for --config (default bytes; a checkpoint has its own)")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the untrained model's weights (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--chunk-tokens", type=int, default=4096,
                   help="tokens per streamed piece, a multiple of the model's segment/memory chunk (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    p.add_argument("--out", default=f"eval-results/{task}", help=f"output directory (default eval-results/{task})")
    p.add_argument("--name", type=parse_names, default=None,
                   help="model name(s) in the tables, one per model (default: the variant)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--compile-memory", action="store_true",
                   help="run the neural memory through torch.compile: compiles first (tens of seconds on CPU), "
                   "then streams faster at small batches (the NIAH demo LMM: 1.5x at batch 1, none at batch 16)")  # fmt: skip


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: niah, babilong, mqar, ppl, zeroshot, throughput",
                       description="Run one of the paper's evaluations on a checkpoint (or an untrained model with "
                       "--config), print the table in the paper's layout and write results.json, results.csv and "
                       "plots into --out.")  # fmt: skip
    tasks = p.add_subparsers(dest="task", required=True, metavar="<task>")

    t = tasks.add_parser("niah", help="needle in a haystack, single (Table 2) and multi-key + heatmap",
                         description="S-NIAH-PK/-N/-W and MK-NIAH accuracy per context length, and the length x depth "
                         "heatmap.")  # fmt: skip
    t.add_argument("--lengths", type=parse_lengths, default=[1024, 2048, 4096],
                   help="context lengths in tokens (1K,4K,...; default 1K,2K,4K)")
    t.add_argument("--variants", type=parse_names, default=["pk", "n", "w"],
                   help="needle variants: pk,n,w,uuid (RULER prompts), kv-pk,kv-n,kv-w (short prompts), "
                   "pair-pk,pair-n,pair-w (one-token keys and values), or the multi-key mk-pk,mk-n,mk-w,mk-wiki, "
                   "mk-milton (text held out of training), mk-unseen (phrasings held out of training)")
    t.add_argument("--needles", type=int, default=None,
                   help="needles per multi-key (mk-) prompt: the asked one and the distractors (default 4)")
    t.add_argument("--samples", type=int, default=20, help="samples per variant and length (default 20)")
    t.add_argument("--depths", type=int, default=10, help="number of evenly spaced needle depths (default 10)")
    t.add_argument("--max-new-tokens", type=int, default=None, help="tokens to decode (default: longest answer + 8)")
    t.add_argument("--batch-size", type=int, default=1,
                   help="prompts streamed side by side (default 1; shorter prompts are left-padded with eos)")

    t = tasks.add_parser("babilong", help="BABILong qa1-qa5 accuracy vs length (Figure 6)",
                         description="bAbI facts hidden in book text; accuracy per task and length, and its plot.")
    t.add_argument("--tasks", type=parse_names, default=["qa1", "qa2", "qa3", "qa4", "qa5"],
                   help="bAbI tasks (default qa1,qa2,qa3,qa4,qa5)")
    t.add_argument("--lengths", type=parse_lengths, default=[1024, 2048, 4096],
                   help="context lengths in tokens (1K,4K,...; default 1K,2K,4K)")
    t.add_argument("--samples", type=int, default=20, help="samples per task and length (default 20)")
    t.add_argument("--max-new-tokens", type=int, default=None, help="tokens to decode (default: longest answer + 8)")

    t = tasks.add_parser("mqar", help="multi-query associative recall (Zoology)",
                         description="MQAR accuracy over queried positions per sequence length and number of pairs.")
    t.add_argument("--seq-lens", type=parse_lengths, default=[256], help="sequence lengths (default 256)")
    t.add_argument("--num-pairs", type=parse_lengths, default=[16], help="key-value pairs per sequence (default 16)")
    t.add_argument("--samples", type=int, default=256, help="sequences per setting (default 256)")
    t.add_argument("--vocab-size", type=int, default=None, help="MQAR vocabulary (default min(8192, model vocab))")
    t.add_argument("--power-a", type=float, default=0.01, help="power-law parameter of the query gaps (default 0.01)")
    t.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default 32)")

    t = tasks.add_parser("ppl", help="perplexity of whole documents streamed + by position (Figure 7)",
                         description="Token perplexity with each document streamed whole through the model, and "
                         "perplexity per position bucket.")  # fmt: skip
    data = t.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="DIR", help="shards written by titans data prepare")
    data.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files, each one document")
    t.add_argument("--split", default="val", help="split of --data to read (default val)")
    t.add_argument("--max-tokens", type=int, default=None, help="stop after scoring this many tokens")
    t.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    t.add_argument("--bucket-edges", type=parse_edges, default=None,
                   help="position bucket edges starting at 0 (default 0,64,128,256,... doubling)")

    t = tasks.add_parser("zeroshot", help="zero-shot multiple choice + LAMBADA (Table 1)",
                         description="Log-likelihood scoring of PIQA, HellaSwag, WinoGrande, ARC-e/-c, SIQA, BoolQ "
                         "(and OpenBookQA), LAMBADA accuracy and perplexity, optional Wiki perplexity.")  # fmt: skip
    t.add_argument("--tasks", type=parse_names,
                   default=["lambada", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "siqa", "boolq"],
                   help="tasks (default: Table 1's): lambada,piqa,hellaswag,winogrande,arc_easy,arc_challenge,siqa,"
                   "boolq,openbookqa")  # fmt: skip
    t.add_argument("--limit", type=int, default=None, help="first N examples of each task (default all)")
    wiki = t.add_mutually_exclusive_group()
    wiki.add_argument("--wiki-data", metavar="DIR", help="shards (val split) for the Wiki ppl column")
    wiki.add_argument("--wiki-text", nargs="+", metavar="FILE", help="text files for the Wiki ppl column")
    t.add_argument("--wiki-max-tokens", type=int, default=None, help="cap on the tokens scored for Wiki ppl")

    t = tasks.add_parser("throughput", help="prefill and decode tokens/s by length",
                         description="Tokens/s of streaming prefill and one-token decoding after it, per length; plot.")
    t.add_argument("--lengths", type=parse_lengths, default=[1024, 4096, 16384], help="sequence lengths (1K,4K,...)")
    t.add_argument("--decode-tokens", type=int, default=32,
                   help="one-token steps timed after each prefill (default 32)")
    t.add_argument("--batch-size", type=int, default=1, help="sequences per batch (default 1)")
    t.add_argument("--repeats", type=int, default=1, help="measure each length this many times, keep the fastest")

    for name, parser in tasks.choices.items():
        _common(parser, name)
        parser.epilog = ("With --config, model fields can be overridden as --model.KEY=VALUE (e.g. --model.dim=64); "
                         "with --checkpoint, the settings that keep every weight's shape (test-time settings, "
                         "e.g. --model.memory_max_grad_norm=5), recorded in results.json.")
        # the dispatcher hands unparsed --section.key=value arguments over as args.overrides
        parser.set_defaults(func=run, accepts_overrides=True)
    p.set_defaults(func=run, accepts_overrides=True)


def _device(name: str):
    from ..train.trainer import resolve_device

    return resolve_device(name, "--device")


def _untrained_config(args, variant: str, vocab_size: int):
    from ..io.config_files import apply_overrides, check_keys, load_config_file
    from ..model import TitansConfig

    known = [f for f in TitansConfig.__dataclass_fields__]
    if args.config in UNTRAINED:
        base = dict(UNTRAINED[args.config])
        preset = base.pop("preset", None)
        fields = {**(TitansConfig.preset(preset).to_dict() if preset else {}), **base}
    else:
        data = load_config_file(args.config)
        fields = data.get("model", data)
        if not isinstance(fields, dict):
            raise ConfigError(f"{args.config}: 'model' must be a mapping of TitansConfig fields")
    fields = {**fields, "variant": variant, "vocab_size": vocab_size}
    overridden = apply_overrides({"model": fields}, getattr(args, "overrides", None) or [])
    check_keys(overridden, ["model"], "overrides (use --model.KEY=VALUE)")
    fields = overridden["model"]
    check_keys(fields, known, f"model config ({args.config})")
    try:
        return TitansConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model config ({args.config}): {err}") from err


def checkpoint_settings(overrides: list[str]) -> dict | None:
    """``--model.KEY=VALUE`` items with a checkpoint: model settings to run it with instead of its
    own (those that keep every weight's shape: the memory's clip, chunk size, learning-rate cap,
    ...), checked against ``TitansConfig`` (unknown keys get the closest name) and typed."""
    from ..io.config_files import apply_overrides, check_keys, coerce_fields
    from ..model import TitansConfig

    if not overrides:
        return None
    given = apply_overrides({}, overrides)
    check_keys(given, ["model"], "overrides with a checkpoint (use --model.KEY=VALUE)")
    check_keys(given["model"], list(TitansConfig.__dataclass_fields__), "--model")
    return coerce_fields(TitansConfig, given["model"], "model")


def model_sources(args) -> list[tuple[str, str]]:
    """What to evaluate, one entry per table row: ("checkpoint", path) or ("untrained", variant)."""
    if args.checkpoint:
        if args.tokenizer or args.variant:
            raise ConfigError("--variant and --tokenizer apply to --config only; a checkpoint has its own")
        return [("checkpoint", path) for path in args.checkpoint]
    return [("untrained", variant) for variant in (args.variant or ["mac"])]


def load_model(args, source: tuple[str, str]):
    """(model in eval mode on the device, tokenizer, info) for one entry of ``model_sources``."""
    model, tokenizer, info = _load_model(args, source)
    return model.set_memory_compile(getattr(args, "compile_memory", False)), tokenizer, info


def _load_model(args, source: tuple[str, str]):
    import torch

    device = _device(args.device)
    kind, what = source
    if kind == "checkpoint":
        from ..train.checkpoint import CheckpointError, load_pretrained

        try:
            settings = checkpoint_settings(getattr(args, "overrides", None))
            model, tokenizer, info = load_pretrained(what, map_location=device, model_settings=settings)
        except CheckpointError as err:
            raise ConfigError(str(err)) from err
        out = {"checkpoint": info["path"], "step": info.get("step")}
        if "model_settings" in info:
            out["model_settings"] = info["model_settings"]
        return model, tokenizer, out
    from ..data.tokenizers import load_tokenizer
    from ..model import TitansLM

    try:
        tokenizer = load_tokenizer(args.tokenizer or "bytes")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"--tokenizer {args.tokenizer}: {err}") from err
    torch.manual_seed(args.init_seed)
    model = TitansLM(_untrained_config(args, what, tokenizer.vocab_size)).to(device).eval()
    return model, tokenizer, {"checkpoint": None, "untrained": args.config, "init_seed": args.init_seed}


def _documents(tokenizer, data_dir, texts, split="val"):
    from .perplexity import shard_documents, text_file_documents

    try:
        if data_dir is not None:
            return shard_documents(data_dir, split, tokenizer=tokenizer), f"{data_dir} ({split})"
        return text_file_documents(texts, tokenizer), ", ".join(map(str, texts))
    except (FileNotFoundError, ValueError) as err:  # missing/corrupt shards, wrong tokenizer
        raise ConfigError(str(err)) from err


def _run_task(args, model, tokenizer, common):
    from . import babilong, mqar, niah, perplexity, throughput, zeroshot

    if args.task == "niah":
        return niah.run_niah(model, tokenizer, args.lengths, args.variants, samples=args.samples, depths=args.depths,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, needles=args.needles,
                             bar_unit="token" if args.batch_size > 1 else "sample", **common)  # fmt: skip
    if args.task == "babilong":
        return babilong.run_babilong(model, tokenizer, args.tasks, args.lengths, samples=args.samples,
                                     max_new_tokens=args.max_new_tokens, **common)  # fmt: skip
    if args.task == "mqar":
        return mqar.run_mqar(model, args.seq_lens, args.num_pairs, samples=args.samples, vocab_size=args.vocab_size,
                             power_a=args.power_a, batch_size=args.batch_size, **common)  # fmt: skip
    if args.task == "throughput":
        return throughput.run_throughput(model, args.lengths, decode_tokens=args.decode_tokens,
                                         batch_size=args.batch_size, repeats=args.repeats, **common)  # fmt: skip
    common.pop("seed")  # nothing is sampled below
    if args.task == "ppl":
        docs, source = _documents(tokenizer, args.data, args.text, args.split)
        return perplexity.run_perplexity(model, docs, tokenizer=tokenizer, edges=args.bucket_edges,
                                         max_tokens=args.max_tokens, max_docs=args.max_docs, source=source,
                                         **common)  # fmt: skip
    wiki = None
    if args.wiki_data or args.wiki_text:
        docs, _ = _documents(tokenizer, args.wiki_data, args.wiki_text)
        wiki = _cap_tokens(docs, args.wiki_max_tokens)
    return zeroshot.run_zeroshot(model, tokenizer, args.tasks, limit=args.limit, wiki_documents=wiki, **common)


def _report(task: str, results, out: Path):
    """One result for every model evaluated: rows and records merged, the table redrawn with a
    line per model, and the task's plot drawn from all of them."""
    from . import babilong, mqar, niah, perplexity, throughput, zeroshot
    from .report import combine_results

    table = {"niah": niah.niah_table, "babilong": babilong.babilong_table, "mqar": mqar.mqar_table,
             "ppl": perplexity.ppl_table, "zeroshot": zeroshot.zeroshot_table,
             "throughput": throughput.throughput_table}[task]  # fmt: skip
    res = combine_results(results, table)
    if task == "niah":
        res.plots.append(niah.plot_niah_heatmap(res.records, out / "niah_heatmap.png"))
    elif task == "babilong":
        res.plots.append(babilong.plot_babilong(res.rows, out / "babilong.png"))
    elif task == "ppl":
        res.plots.append(perplexity.plot_ppl_by_position(res.rows, out / "ppl_by_position.png"))
    elif task == "throughput":
        res.plots.append(throughput.plot_throughput(res.rows, out / "throughput.png"))
    return res


def _cap_tokens(docs, max_tokens):
    """Documents cut so that at most ``max_tokens`` tokens are scored in total."""
    if max_tokens is None:
        yield from docs
        return
    left = max_tokens
    for doc in docs:
        if left <= 0:
            return
        yield doc[:left]
        left -= len(doc)


def _name(args, i: int, sources: list[tuple[str, str]], variant: str, taken: list[str]) -> str:
    """The model's name in the tables: --name, else its variant; with several checkpoints, the
    variant and the checkpoint's directory name ("mac (step-0000300)")."""
    if args.name:
        return args.name[i]
    kind, what = sources[i]
    name = f"{variant} ({Path(what).name})" if kind == "checkpoint" and len(sources) > 1 else variant
    return name if name not in taken else f"{name} #{i + 1}"


# Upper bounds of the count arguments: far beyond any useful run, low enough that nothing
# overflows or tries to allocate a buffer of that size.
_UPPER = {"samples": 10**6, "depths": 10**4, "limit": 10**9, "max_new_tokens": 10**6, "batch_size": 4096,
          "decode_tokens": 10**6, "max_tokens": MAX_LENGTH, "max_docs": 10**9, "repeats": 10**4,
          "wiki_max_tokens": MAX_LENGTH}  # fmt: skip


def _check_args(args, sources) -> None:
    for flag, high in _UPPER.items():
        check_range(f"--{flag.replace('_', '-')}", getattr(args, flag, None), 1, high)
    check_seed("--seed", args.seed)
    check_seed("--init-seed", args.init_seed)
    if getattr(args, "vocab_size", None) is not None and args.vocab_size < 2:
        raise ConfigError(f"--vocab-size must be >= 2 (keys and values are drawn from it), got {args.vocab_size}")
    power_a = getattr(args, "power_a", None)
    if power_a is not None and not 0 < power_a < math.inf:
        raise ConfigError(f"--power-a must be a finite number > 0, got {power_a}")
    if args.name and len(args.name) != len(sources):
        raise ConfigError(f"--name gives {len(args.name)} name(s) for {len(sources)} model(s)")
    if args.name and len(set(args.name)) < len(args.name):
        raise ConfigError(f"--name repeats a name: {args.name}")


def run(args) -> int:
    import torch

    from ..data.packages import PackageUnavailable
    from .report import EvalSettingError
    from .streaming import check_chunk_tokens

    sources = model_sources(args)
    _check_args(args, sources)
    if Path(args.out).exists() and not Path(args.out).is_dir():  # found before any model runs
        raise ConfigError(f"--out {args.out} is a file: give a directory for the results")
    results, names = [], []
    for i, source in enumerate(sources):  # one model in memory at a time
        model, tokenizer, info = load_model(args, source)
        names.append(_name(args, i, sources, model.cfg.variant, names))
        common = dict(chunk_tokens=args.chunk_tokens, seed=args.seed, model_name=names[-1],
                      progress=not args.no_progress)  # fmt: skip
        try:
            check_chunk_tokens(model, args.chunk_tokens)
            res = _run_task(args, model, tokenizer, common)
        except (EvalSettingError, PackageUnavailable) as err:  # the user's settings or data, not a bug
            raise ConfigError(f"{names[-1]}: {err}" if len(sources) > 1 else str(err)) from err
        res.meta["model"] = dict(name=names[-1], config=model.cfg.to_dict(), parameters=model.num_parameters(),
                                 tokenizer=tokenizer.to_spec(), **info)  # fmt: skip
        res.meta.update(command=f"titans eval {args.task}", device=str(next(model.parameters()).device),
                        torch=torch.__version__)  # fmt: skip
        results.append(res)
        del model
    res = _report(args.task, results, Path(args.out))
    paths = res.save(args.out)
    print(res.table)
    print("wrote " + ", ".join(str(p) for p in paths + [Path(p) for p in res.plots]))
    return 0
