"""Command line: ``titans <command>`` or ``python -m titans <command>``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="titans", description="Titans: learning to memorize at test time")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="memorise key-value pairs at test time and recall them")
    demo.add_argument("--head-dim", type=int, default=64, help="width of keys and values (default 64)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .recall_demo import main as demo_main

        demo_main(head_dim=args.head_dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
