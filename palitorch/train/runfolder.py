"""The run folder ([train] out): what belongs in it, the leftovers of interrupted writes, metrics.jsonl on resume.

    RUN/config.toml  metrics.jsonl  tokenizer/  checkpoint-NNNNNNN/ ...  model/     what a run writes (config.toml
                                                                                     first: it marks a run folder)
    RUN/best/  best.json                                 [checkpoint] best's model (train/best.py)
    RUN/.checkpoint-NNNNNNN.abcd1234/  .model.abcd1234/  .state.abcd1234/           being written (mkdtemp names)
    RUN/.best.abcd1234/  best.json.part
    RUN/.metrics.jsonl.abcd1234  .checkpoint-NNNNNNN.pruned/                        being rewritten / deleted
    RUN/checkpoint-NNNNNNN.damaged/                                                 found damaged by a resume
    RUN/.lock                                            held (flock) by the process training in the folder

A process killed mid-write (kill -9, power loss) leaves the hidden names behind; `remove_leftovers` deletes them
when a run starts or resumes. A new run refuses a non-empty folder that holds anything else, or a finished run's
model/ (it would be replaced). A second process training in a folder in use (a job requeued while the first
still runs) is refused (`lock`). `check_out_folder` and `check_can_create` refuse, before any work, a path that
cannot become a folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from palitorch.errors import ConfigError

LEFTOVER = re.compile(r"\.(checkpoint-\d{7,}|model|best|state|metrics\.jsonl)\.([a-z0-9_]{8}|pruned)|best\.json\.part")
RUN_NAMES = re.compile(r"config\.toml|metrics\.jsonl|tokenizer|(model|best)(\.old)?|best\.json|"
                       r"checkpoint-\d{7,}(\.old|\.damaged\d*)?")


def check_new_run(run: Path) -> None:
    """Refuse to start a run in a folder holding files that are not a run's (they would be replaced or deleted)."""
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--train.out {run} is a file: choose an empty or new folder")
    names = [p.name for p in run.iterdir() if p.name != ".lock"] if run.is_dir() else []  # (lock: see `lock`)
    foreign = [n for n in names if not (RUN_NAMES.fullmatch(n) or LEFTOVER.fullmatch(n))]
    if names and (foreign or "config.toml" not in names):
        what = f"holds {sorted(foreign)[0]!r}" if foreign else f"holds {sorted(names)[0]!r} but no config.toml"
        raise ConfigError(f"--train.out {run} is not empty and not a palitorch run folder (it {what}): choose an "
                          "empty or new folder")
    if (run / "model").is_dir():
        raise ConfigError(f"--train.out {run} holds a finished run (its model/): a new run there would replace it; "
                          "choose another folder, or delete the old run first")


def lock_run(run: Path, d, device) -> None:
    """The first process makes the run folder and locks it (`lock`); under torchrun every process learns whether it
    could (a collective on ddp.Dist `d`), so that all stop with its error instead of waiting for it."""
    import torch

    from palitorch.train import ddp

    busy = None
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        try:
            lock(run)
        except ConfigError as e:
            busy = e
    if d.enabled:
        flag = ddp.all_reduce_sum(torch.tensor(float(busy is not None), device=device), d)
        if float(flag) > 0 and busy is None:
            busy = ConfigError(f"--train.out {run} is in use by a palitorch train still running")
    if busy is not None:
        raise busy


_held: dict[Path, object] = {}  # run folder -> this process's open lock file


def lock(run: Path) -> None:
    """Hold RUN/.lock (flock) while this process trains there, until `unlock`; ConfigError if another process holds
    it. A lock this process still holds (a Trainer interrupted in a notebook, then resumed) passes to the new run.
    Where flock does not exist (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return
    unlock(run)
    f = open(run / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):  # a file system without locks (some network ones): none
            f.close()
            return
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"--train.out {run} is in use by a palitorch train still running ({holder}): wait for it "
                          "to end or stop it, or choose another folder") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[run.resolve()] = f


def unlock(run: Path) -> None:
    """Let go of RUN/.lock if this process holds it (the file stays: deleting it would race with a new holder)."""
    f = _held.pop(run.resolve(), None)
    if f is not None:
        f.close()


def remove_leftovers(run: Path) -> list[str]:
    """Delete what interrupted writes left (see LEFTOVER); returns the names deleted. A best/ whose replacement was
    cut between its two renames (best/ -> best.old/, new -> best/) is put back: best.json names that model."""
    if (run / "best.old").is_dir() and not (run / "best").exists():
        (run / "best.old").rename(run / "best")
    gone = sorted(p.name for p in run.iterdir() if LEFTOVER.fullmatch(p.name))
    for name in gone:
        p = run / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


def put_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the resume order (kept for the user to inspect or delete)."""
    dst, i = folder.with_name(folder.name + ".damaged"), 1
    while dst.exists():
        i += 1
        dst = folder.with_name(f"{folder.name}.damaged{i}")
    return folder.rename(dst)


def append_metrics(run: Path, row: dict) -> None:
    """One row (a JSON object on its own line) at the end of RUN/metrics.jsonl."""
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def metric_rows(run: Path) -> list[tuple[str, dict]]:
    """RUN/metrics.jsonl's rows (JSON objects), each with its line; unreadable lines (a kill while a row was written
    leaves half a line) are skipped. [] without the file."""
    try:
        lines = (run / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def trim_metrics(run: Path, step: int) -> None:
    """Keep metrics.jsonl's rows up to `step` (a resume forgets what the interrupted run logged later) and drop
    unreadable lines. Rewritten under a temp name, then renamed."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [line for line, row in metric_rows(run)
            if isinstance(row.get("step", 0), int) and row.get("step", 0) <= step]
    fd, tmp = tempfile.mkstemp(prefix=".metrics.jsonl.", dir=run)
    with os.fdopen(fd, "w") as f:
        f.write("".join(r + "\n" for r in keep))
    os.replace(tmp, path)


def check_out_folder(out: str, what: str = "[train] out") -> None:
    """A one-line ConfigError unless `out` can be made a folder: not empty, no file at or above it."""
    if not out:
        raise ConfigError(f"{what} is empty: name the output folder")
    path = Path(out)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking == path:
        raise ConfigError(f"{what} {out!r} is a file: name a folder (it is created)")
    if blocking is not None:
        raise ConfigError(f"{what} {out!r} lies under the file {str(blocking)!r}: name a folder path")


def check_can_create(out: str, what: str = "[train] out") -> None:
    """A one-line ConfigError unless the folder `out` can be made (or written in): a folder is made and removed in
    the nearest existing one, before any work. After check_out_folder; not for --print-config, which writes nothing."""
    path = Path(out).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".palitorch-check-", dir=existing))
    except OSError as e:
        where = "" if existing == path else f" in {str(existing)!r}"
        raise ConfigError(f"{what} {out!r}: cannot write a folder{where} ({e.strerror}): choose another path") \
            from None
