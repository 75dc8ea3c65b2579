"""The `palitorch` command's entry point: imports the command line (and torch, seconds) with Ctrl-C held back, so
that an interrupt while it loads ends the command quietly (exit 130) once the import is done, rather than raising
inside torch's or numpy's own imports (a traceback, or an interrupt they swallow)."""

import signal
import sys


def main() -> int:
    interrupted = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        from palitorch.cli import main as cli_main
    finally:
        signal.signal(signal.SIGINT, before)
    if interrupted:
        sys.stderr.write("\n")
        return 130
    return cli_main()
