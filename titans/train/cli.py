"""``titans train``: train a model from a config file plus ``--section.key=value`` overrides."""

from __future__ import annotations

HELP = """Train a Titans model (or a baseline) on token shards, the built-in corpus, or generated tasks.

Examples:
  titans train --config configs/tiny.yaml
  titans train --config configs/tiny.yaml --train.max_minutes=10 --model.variant=mag
  titans train --config configs/tiny.yaml --resume auto           # continue an interrupted run
  torchrun --nproc_per_node 2 -m titans train --config configs/tiny.yaml --train.parallel=ddp

Any field of the config's sections can be overridden: --model.<field> (TitansConfig),
--train.<field> (TrainConfig), --data.<field> (DataConfig); see titans/train/config.py.
"""


def register(sub) -> None:
    import argparse

    p = sub.add_parser(
        "train", help="train a model (config file + --section.key=value overrides)", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--config", help="YAML or TOML run config (sections model, train, data); default: built-in defaults")
    p.add_argument(
        "--resume", metavar="auto|PATH",
        help="continue from the latest checkpoint of train.out_dir ('auto') or from a checkpoint directory",
    )  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    import json
    import sys

    from ..runtime.cpu import tune_cpu_allocator
    from .checkpoint import CheckpointError
    from .config import load_run_config
    from .trainer import train

    cfg = load_run_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    tune_cpu_allocator()
    try:
        summary = train(cfg, resume=args.resume)
    except CheckpointError as err:
        print(f"titans train: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the run diverged: the message says where and what to try
        print(f"titans train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"\ntitans train: {err}")
        return 130
    except OSError as err:  # a full disk or an unwritable directory: say what is kept and how to go on
        from ..errors import WRITE_ERRNOS, describe_os_error, machine_refused
        from .checkpoint import latest_checkpoint

        if not machine_refused(err):
            raise
        said = describe_os_error(err)
        if err.errno in WRITE_ERRNOS:
            latest = latest_checkpoint(cfg.train.out_dir)
            said += (f"; the run directory's last complete checkpoint is {latest} (continue with --resume auto)"
                     if latest else "; the run directory holds no checkpoint")  # fmt: skip
        print(f"titans train: {said}", file=sys.stderr)
        return 2
    floor = _unigram_floor(cfg)
    if floor is not None and summary["val_loss"] is not None:
        print(
            f"held-out loss {summary['val_loss']:.4f} nats/token vs unigram entropy of the held-out split "
            f"{floor:.4f} nats/token (a model that ignores context cannot go below the latter)"
        )
    print(
        f"done: step {summary['step']}, train loss {summary['loss']:.4f}, "
        f"val loss {summary['val_loss'] if summary['val_loss'] is None else round(summary['val_loss'], 4)}, "
        f"{summary['seconds']:.0f} s ({summary['stopped']}); checkpoint {summary['checkpoint']}"
    )
    return 0


def _unigram_floor(cfg) -> float | None:
    """Unigram entropy (nats/token) of the text data's held-out split; None for generated data."""
    if cfg.data.kind != "text":
        return None
    from ..data.text import unigram_entropy
    from .sources import prepared_text_dir

    return unigram_entropy(prepared_text_dir(cfg.data), "val")
