"""Command line: ``titans <command>`` or ``python -m titans <command>``.

Each command lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``func`` (called with the parsed arguments, returns an exit code). Modules keep
their heavy imports inside ``func`` so ``titans --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command modules, in the order --help lists them
COMMAND_MODULES = (
    "titans.cli.demo",
    "titans.data.cli",
    "titans.train.cli",
    "titans.eval.cli",
    "titans.cli.generate",
    "titans.cli.bench",
    "titans.timeseries.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titans", description="Titans: learning to memorize at test time")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name or name.startswith(str(err.name) + "."):
                continue  # command not built in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import UserError, describe_os_error, first_line, machine_refused, out_of_memory

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `--section.key=value` overrides go to commands that take them (train, ...)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --train.lr=3e-4)")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"titans {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"titans {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the machine refused a file operation (full disk, read-only, no permission)
        if not machine_refused(err):
            raise
        print(f"titans {args.command}: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(err):
            raise
        smaller = _SMALLER.get(args.command, "smaller sizes")
        print(f"titans {args.command}: out of memory ({first_line(err)}); use {smaller}", file=sys.stderr)
        return 2


# what shrinks a command's memory, for the out-of-memory message
_SMALLER = {
    "train": "fewer rows per micro batch (--train.micro_batch), shorter rows (--train.seq_len) or a smaller model",
    "eval": "shorter lengths, fewer prompts side by side (--batch-size) or smaller chunks (--chunk-tokens)",
    "generate": "a shorter prompt or smaller chunks (--chunk-tokens)",
    "bench": "fewer tokens (--stream-tokens) or rows (--batch)",
    "demo": "shorter lengths (--lengths) or smaller chunks (--chunk-tokens)",
}


if __name__ == "__main__":
    sys.exit(main())
