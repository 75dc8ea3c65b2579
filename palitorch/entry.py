"""The `palitorch` command's entry point: imports the command line (and torch, seconds) under a Ctrl-C guard, so
that an interrupt while it loads ends the command quietly (exit 130) rather than with an import's traceback."""

import sys


def main() -> int:
    try:
        from palitorch.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    return cli_main()
