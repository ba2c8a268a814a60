"""``titans demo``: the README's main job."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="memorise key-value pairs at test time and recall them",
                       description="Stream key/value pairs through a neural memory and recall them.")
    p.add_argument("--head-dim", type=int, default=64, help="width of keys and values (default 64)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..recall_demo import main as demo_main

    demo_main(head_dim=args.head_dim)
    return 0
