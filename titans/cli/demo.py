"""``titans demo``: the README's main job.

``titans demo`` (= ``titans demo niah``) writes four needles with different keys into Shakespeare
and into RULER's noise and asks one by its key, from 1K to 16K tokens, through the shipped tiny
Titans and sliding-window checkpoints (``--retrain`` trains them again).
``titans demo recall`` streams key/value pairs through an untrained neural memory layer and
recalls them (no training needed).
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="memorising at test time: key/value recall, or needles in long haystacks (niah)",
        description=__doc__,
    )  # fmt: skip
    p.add_argument("which", nargs="?", default="niah", choices=("niah", "recall"),
                   help="niah: needle-in-a-haystack demonstration with the shipped checkpoints (default); "
                        "recall: memory layer key/value recall")
    p.add_argument("--head-dim", type=int, default=None, help="recall: width of keys and values (default 64)")
    p.add_argument("--lengths", default="1K,4K,16K", help="niah: haystack lengths in tokens (default 1K,4K,16K)")
    p.add_argument("--samples", type=int, default=16,
                   help="niah: prompts per length, the (asked) needle at evenly spaced depths (default 16)")
    p.add_argument("--needles", type=int, default=None,
                   help="niah: needles per multi-key (mk-) prompt, the asked one and its distractors (default 4)")
    p.add_argument("--models", default=None,
                   help="niah: comma-separated subset of titans-mag,swa (default all)")
    p.add_argument("--out", default="demo-out", help="niah: directory for the heatmap and results (default demo-out)")
    p.add_argument("--variants", default="mk-n,mk-pk",
                   help="niah: needle tests, variants of `titans eval niah` (default mk-n,mk-pk: four needles in "
                        "Shakespeare / in noise, one asked by its key)")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="niah: tokens per streaming call (default 4096)")
    p.add_argument("--retrain", action="store_true", help="niah: train the checkpoints again from titans/recipes first")
    p.add_argument("--work-dir", default="runs/demo", help="niah --retrain: training directory (default runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="niah: no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.which == "niah":
        import argparse

        from ..demos.niah import DEMO_MODELS
        from ..demos.niah import main as niah_main
        from ..errors import UserError
        from ..eval.cli import parse_lengths

        try:
            args.lengths = parse_lengths(args.lengths)
        except argparse.ArgumentTypeError as err:
            raise UserError(f"--lengths {err}") from None
        args.models = args.models.split(",") if args.models else None
        unknown = [m for m in args.models or [] if m not in DEMO_MODELS]
        if unknown:
            raise UserError(f"--models: unknown {unknown}; choose from {sorted(DEMO_MODELS)}")
        from ..eval.niah import NIAH_VARIANTS

        args.variants = [v for v in args.variants.split(",") if v]
        unknown = [v for v in args.variants if v not in NIAH_VARIANTS]
        if unknown or not args.variants:
            raise UserError(f"--variants: unknown {unknown}; choose from {sorted(NIAH_VARIANTS)}")
        if args.needles is not None and not any(v.startswith("mk-") for v in args.variants):
            raise UserError("--needles sets the needles of a multi-key (mk-) prompt; prompts per length is --samples")
        args.needles = 4 if args.needles is None else args.needles
        if args.head_dim is not None:
            raise UserError("--head-dim sets the recall demo's width (titans demo recall); the needle demo's models are fixed")
        return niah_main(args)
    from ..demos.recall import main as demo_main
    from ..io.config_files import check_range

    head_dim = 64 if args.head_dim is None else args.head_dim
    check_range("--head-dim", head_dim, 2, 4096)
    demo_main(head_dim=head_dim)
    return 0
