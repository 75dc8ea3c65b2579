"""The results file of `palitorch batch`: durable appends, what an earlier run left (to resume), input order.

A result line is a JSON object with an integer "index" (its request's line number in the input). Lines are
appended as batches finish and made durable (flush + fsync) before the next batch; a crash can leave only a
last line cut short, which the next run drops. Finished, the file is rewritten in input order, through a new
file beside it renamed over it: all of it or none.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from palitorch.errors import InputError

try:
    import fcntl
except ImportError:  # (Windows: no lock)
    fcntl = None

# Fields an output line sets itself: a request's own fields of these names are not copied to it. (A request's
# "top_logprobs" is a count, a decoding option kept in "decoding"; the output's is the list of alternatives.)
RESULT_FIELDS = frozenset({"index", "decoding", "generated_by", "error", "text", "token_ids", "logprobs",
                           "finish_reason", "prompt_tokens", "detections", "segmentations", "top_logprobs",
                           "beams"})


_PROCESS_FILE = re.compile(r"/dev/(stdin|stdout|stderr|fd/\d+)|/proc/[^/]+/fd/\d+")


def is_stream(path: Path) -> bool:
    """Whether a path is read or written as a stream rather than a file: a process's file descriptor (/dev/stdout,
    /proc/self/fd/1), a device (anything under /dev/ but /dev/shm's files), or a pipe."""
    p = str(path)
    if _PROCESS_FILE.fullmatch(p) or (p.startswith("/dev/") and not p.startswith("/dev/shm/")):
        return True
    return path.exists() and not path.is_file()


_OWN_FD = re.compile(r"/dev/(stdout|stderr|fd/(\d+))|/proc/self/fd/(\d+)")


def open_output(path: Path):
    """`path` opened for appending bytes. This process's own file descriptor (`-` is /dev/stdout, /dev/stderr,
    /dev/fd/N) is taken as the process holds it, which shares its offset with the shell that opened it: opened anew,
    a file that `cmd > out` made would be written at an offset of its own, and what the shell (or the process) wrote
    to it next would overwrite the lines. Flush sys.stdout and sys.stderr first."""
    if m := _OWN_FD.fullmatch(str(path)):
        fd = {"stdout": 1, "stderr": 2}.get(m[1]) or int(m[2] or m[3])
        try:
            return os.fdopen(os.dup(fd), "ab")
        except OSError:
            pass  # (not open in this process: opened by its name, as before)
    return open(path, "ab")  # noqa: SIM115 (the caller closes it)


def output_target(path: Path) -> tuple[Path, bool]:
    """Where `--output PATH` writes, and whether that is a stream: a device, a pipe or a process's file descriptor
    (`-`, /dev/stdout, /proc/self/fd/1, also through links), written in order and never read back, resumed or
    rewritten (the rewrite in input order would replace the link, or a file the shell holds open). A link to a
    regular file is followed, so the file is updated rather than the link replaced."""
    if str(path) == "-":
        return Path("/dev/stdout"), True
    p = Path(os.path.realpath(Path(path).parent)) / Path(path).name
    for _ in range(40):  # a loop of links ends here, and reads as a missing file
        if is_stream(p):
            return p, True
        if not p.is_symlink():
            break
        target = Path(os.readlink(p))
        p = target if target.is_absolute() else p.parent / target
        p = Path(os.path.realpath(p.parent)) / p.name
    return p, p.exists() and not p.is_file()


def read_done(output: Path) -> tuple[dict[int, dict], Callable[[], None]]:
    """Answers already in `output` by index, and `tidy()`, which removes from the file a last line cut short by a
    crash and the error lines (their requests run again: the image may be there now). Call it once every check
    has passed. A file with content but no result line at all is refused: it is not an earlier run's output."""
    if not output.exists():
        return {}, lambda: None
    try:
        data = output.read_bytes()
    except OSError as e:
        raise InputError(f"--output {output}: cannot read it to resume ({e.strerror}): choose another file") from None
    end = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished line
    lines = data[:end].splitlines()
    if (tail := _record(data[end:])) is not None:  # complete but missing its newline (e.g. edited by hand): keep it
        lines.append(data[end:])
    records = [_record(line) for line in lines]
    if data.strip() and not any(records):
        raise InputError(f"--output {output} exists and holds no results of palitorch batch: choose another file")
    done, kept = {}, []
    for line, record in zip(lines, records):
        if record is None:
            if line.strip():
                print(f"palitorch batch: dropping an unreadable line from {output}; its request runs again",
                      file=sys.stderr)
        elif "error" not in record:
            done[record["index"]] = record
            kept.append(line)

    def tidy() -> None:
        if len(kept) == len(lines) and tail is None:
            if end < len(data):
                with open(output, "r+b") as f:
                    f.truncate(end)
            return
        replace_lines(output, kept)

    return done, tidy


def replace_lines(path: Path, lines: list[bytes]) -> None:
    """Write `lines` to a new file beside `path`, sync it, then rename it over `path`: all of it or none."""
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as f:
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
    except OSError:  # (a full disk: the part would keep holding the space; `path` is as it was)
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)


def part_files(output: Path) -> list[Path]:
    """The files `<output>.rank<N>` that the processes of a multi-process run (torchrun) write beside `output`."""
    prefix = output.name + ".rank"
    if not output.parent.is_dir():
        return []
    return sorted(p for p in output.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())


def fold_parts(output: Path) -> int:
    """Fold the part files of an earlier multi-process run into `output` (they are left behind when it stopped
    early): their complete result lines join the output's, one line per request (an answer wins over an error),
    in input order, through a new file renamed over the output; then the parts are deleted. A line of the output
    that is not a result is kept for `read_done` to judge. Returns how many parts were folded."""
    parts = part_files(output)
    if not parts:
        return 0
    own = output.read_bytes().splitlines() if output.exists() else []
    theirs = []
    for part in parts:
        data = part.read_bytes()
        theirs += data[:data.rfind(b"\n") + 1].splitlines()  # after the last newline: a line cut short
    lines, best = [], {}  # index -> position in lines of its line
    for line, mine in [(line, True) for line in own] + [(line, False) for line in theirs]:
        record = _record(line)
        if record is None:
            if mine and line.strip():
                lines.append(line)
            continue
        where = best.get(record["index"])
        if where is None:
            best[record["index"]] = len(lines)
            lines.append(line)
        elif "error" in (_record(lines[where]) or {}) and "error" not in record:
            lines[where] = line
    lines.sort(key=lambda line: (_record(line) or {}).get("index", 0))
    replace_lines(output, lines)
    for part in parts:
        part.unlink()
    return len(parts)


def sort_by_index(path: Path) -> None:
    """Put a finished output's lines in input order (they are written in completion order)."""
    lines = path.read_bytes().splitlines()
    order = sorted(range(len(lines)), key=lambda i: (_record(lines[i]) or {}).get("index", 0))
    if order != list(range(len(lines))):
        replace_lines(path, [lines[i] for i in order])


def _record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    index = record.get("index") if isinstance(record, dict) else None
    ok = isinstance(index, int) and not isinstance(index, bool)  # (true is an int to Python, not to JSON)
    return record if ok else None


class Writer:
    """Appends result lines; `commit()` makes the lines written so far durable (flush + fsync; a device or a pipe,
    such as /dev/null, is only flushed)."""

    def __init__(self, path: Path, stream: bool = False):
        try:
            self.file = open_output(path) if stream else open(path, "ab")  # noqa: SIM115 (open for the run)
        except OSError as e:
            raise InputError(f"--output {path}: cannot write there ({e.strerror}): choose another file") from None
        self.regular = stat.S_ISREG(os.fstat(self.file.fileno()).st_mode) and not stream  # (see output_target)
        self.errors = self.results = 0

    def add(self, req_fields: dict, index: int, **result) -> None:
        self.errors += "error" in result
        self.results += "error" not in result
        own = {k: v for k, v in req_fields.items() if k not in RESULT_FIELDS}
        record = {**own, "index": index, **result}
        try:
            line = json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the input): JSON's escape keeps it as it was
            line = json.dumps(record).encode("ascii")
        self.file.write(line + b"\n")

    def commit(self) -> None:
        self.file.flush()
        if self.regular:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        try:
            self.commit()
        finally:  # (closed even when the disk is full: the error that says so goes on)
            self.file.close()


@contextmanager
def output_lock(output: Path):
    """Hold `<output>.lock` (flock) while a run reads and writes `output`: a second run on the same output, which
    would answer the same requests again and append them as duplicates, or write to a file the first one has just
    replaced by its copy in input order (its lines lost), is refused. The lock file is removed at the end; the
    kernel drops the lock of a process that dies. No lock where the folder takes no new file (its checks say so)."""
    lock = output.with_name(output.name + ".lock")
    fd = None
    while fcntl is not None:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # (BlockingIOError: another process holds it)
            os.close(fd)
            raise InputError(f"--output {output} is being written by another palitorch batch (it holds "
                             f"{lock.name}): wait for it to finish, or choose another --output") from None
        try:  # the run that held it may have removed it between our open and our lock: then lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)  # (while still held: a run that opened it meanwhile sees it is gone)
            os.close(fd)


def check_writable(output: Path) -> None:
    """Before any work: an existing output must be writable, and so must its folder (the output is rewritten in
    input order at the end, through a new file beside it). A new output is created by Writer, which says so if
    it cannot."""
    if not output.exists():
        return
    try:
        open(output, "r+b").close()  # opened for writing, left unchanged
    except OSError as e:
        raise InputError(f"--output {output}: cannot write it ({e.strerror}): choose another file") from None
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise InputError(f"--output {output}: cannot write in its folder {str(output.parent)!r} (permission denied), "
                         "where the finished output is put in input order: choose another folder")
