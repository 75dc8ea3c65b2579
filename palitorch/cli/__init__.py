"""The `palitorch` command line. Each subcommand lives in its own module with `add_parser(subparsers)`.

Errors that are the user's to fix (PalitorchError) print as one line and exit 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from palitorch.cli.common import one_line_errors
from palitorch.errors import PalitorchError

COMMANDS = ("run", "chat", "batch", "serve", "train", "data", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palitorch", description="PaliGemma in plain PyTorch.")
    one_line_errors(parser)  # unknown options are reported by this top-level parser
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"palitorch.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"palitorch.cli.{name}":
                raise
            continue  # a subcommand not written yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun every process meets the same error: only the first says it (RANK is torchrun's).
    first = os.environ.get("RANK", "0") == "0"
    try:
        return int(args.func(args) or 0)
    except PalitorchError as e:
        if first:
            print(f"palitorch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if first:  # a newline ends the ^C line; Interrupted carries a line on how to go on
            print(f"\npalitorch {args.command}: {e}" if str(e) else "", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
