"""The `palitorch` command line. Each subcommand lives in its own module with `add_parser(subparsers)`.

Errors that are the user's to fix (PalitorchError) print as one line and exit 2; never a traceback. So does an
OSError about a file or folder (a path the user gave that cannot be read or written), or a full disk; any other
exception is a bug and keeps its traceback. A closed pipe (`palitorch run ... | head -c 100`) ends the command
quietly with status 141, as SIGPIPE ends other command-line tools.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from palitorch.cli import common
from palitorch.cli.common import one_line_errors
from palitorch.errors import PalitorchError, ProcessError

COMMANDS = ("run", "chat", "batch", "eval", "serve", "train", "merge", "data", "demo")
# What to lower when a command runs out of memory.
LOWER = {"train": "lower [train] micro_batch_size, set [train] gradient_checkpointing = true, or train LoRA",
         "serve": "lower --max-batch-size, or use --dtype bfloat16",
         "eval": "lower --batch-size or --max-new-tokens, or use --dtype bfloat16",
         "": "lower --batch-size, --max-new-tokens or --num-beams, or use --dtype bfloat16"}
# Errors without a file name that are still the machine's, not the program's: say them in one line.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES, errno.EPERM}


def build_parser() -> argparse.ArgumentParser:
    from palitorch import __version__

    parser = argparse.ArgumentParser(prog="palitorch", description="PaliGemma in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"palitorch {__version__}")
    one_line_errors(parser)
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


# Options whose value is free text, which may start with "-" (a stop string "- item", a prompt "-x"): argparse
# would take such a value for an option of its own.
TEXT_OPTIONS = ("--stop", "--prompt")


def attach_text_values(argv: list[str]) -> list[str]:
    """`--stop -x` as `--stop=-x` (what follows a text option is its value when it starts with one "-"; "--json"
    or "-h" after it is still an option, so a forgotten value is still reported)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--":  # everything after it is positional already
            return out + argv[i:]
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in TEXT_OPTIONS and following.startswith("-") and not following.startswith("--") \
                and following != "-h":
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = attach_text_values(sys.argv[1:] if argv is None else list(argv))
    try:  # (imports every subcommand's module: Ctrl-C there, as the command starts, is as quiet as in the entry's)
        parser = build_parser()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    common.ARGV[:] = argv  # (for one_line_errors: a misspelt option is named as such, with the nearest one)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's own parser, so that the hint is `palitorch chat --help`
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Under torchrun every process meets the same error: only the first says it (RANK is torchrun's), unless the
    # error is its own process's (ProcessError: that process says it).
    first = os.environ.get("RANK", "0") == "0"
    try:
        return int(args.func(args) or 0)
    except PalitorchError as e:
        if first or isinstance(e, ProcessError):
            print(f"palitorch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if first:  # a newline ends the ^C line; Interrupted carries a line on how to go on
            print(f"\npalitorch {args.command}: {e}" if str(e) else "", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # (torch.OutOfMemoryError is a RuntimeError)
        if not _out_of_memory(e):
            raise
        what = (str(e).splitlines() or [type(e).__name__])[0][:160]
        rank = "" if first else f" (process {os.environ.get('RANK')})"  # (a process's own: each says it)
        print(f"palitorch {args.command}: error: out of memory{rank} ({what}): {LOWER.get(args.command, LOWER[''])}",
              file=sys.stderr)
        return 1
    except BrokenPipeError:
        stdout_to_devnull()
        return 141  # 128 + SIGPIPE: what a reader that stopped early (head) expects of a writer
    except OSError as e:
        if e.filename is None and e.errno not in ENVIRONMENT_ERRNOS:
            raise
        if first:
            print(f"palitorch {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2


def _out_of_memory(e: BaseException) -> bool:
    """Whether an error is an allocation that failed (host or GPU memory): the input asked for too much."""
    text = str(e)
    return isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text


def os_error_line(e: OSError) -> str:
    """'cannot use /proc/1/x: No such file or directory (check the path and its permissions)'."""
    why = e.strerror or str(e)
    if e.filename is None:  # (a write to a file already open: a full disk, a quota)
        return f"{why} (free some space, or write elsewhere)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else why
    paths = " -> ".join(os.fsdecode(f) for f in (e.filename, e.filename2) if f is not None)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot use {paths}: {why} (free some space, or write elsewhere)"
    return f"cannot use {paths}: {why} (check the path and its permissions)"


def stdout_to_devnull() -> None:
    """After a broken pipe, point stdout at /dev/null: Python flushes stdout once more at exit, which would fail
    again (and print 'Exception ignored ... BrokenPipeError')."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (tests capture it)
        pass


if __name__ == "__main__":
    sys.exit(main())
