"""Edges of the command line met by trying it: Ctrl-C while the subcommands import, two `batch` runs on one output,
a full disk under `batch`, an interrupted resumed run's count, and path options given as empty strings."""

import contextlib
import errno
import json
import os
import types

import pytest
from conftest import cli  # tests/cli/conftest.py

import palitorch.cli
from palitorch.cli import results
from palitorch.errors import InputError

fcntl = pytest.importorskip("fcntl")


def write_requests(path, n=7):
    path.write_text("".join(json.dumps({"image": "imgs/red.png", "prompt": f"caption {i}"}) + "\n"
                            for i in range(1, n + 1)))
    return path


def indices(path):
    return [json.loads(line)["index"] for line in path.read_text().splitlines()]


def test_ctrl_c_while_the_subcommands_import_is_quiet(monkeypatch, capsys):
    """The entry point holds Ctrl-C back while palitorch.cli imports, but the subcommands' modules import after it
    (build_parser): an interrupt there printed a KeyboardInterrupt traceback from inside an import."""

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(palitorch.cli, "importlib", types.SimpleNamespace(import_module=interrupted))
    rc, out, err = cli(["batch", "--input", "in.jsonl", "--output", "out.jsonl"], capsys)
    assert (rc, out, err) == (130, "", "\n")


def test_a_second_run_on_the_same_output_is_refused(fake_pipe, images, capsys):
    """Two runs on one output (the command started again in another terminal) both answered every request: each
    line twice, and lines the second appended after the first had put the file in input order were lost. While a
    run holds `<output>.lock`, another is refused in one line, before any work; a finished run removes the lock."""
    src, dst = write_requests(images.parent / "requests.jsonl"), images.parent / "out.jsonl"
    fake_pipe(lambda image, prompt: "ok")
    lock = os.open(images.parent / "out.jsonl.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        rc, out, err = cli(["batch", "--input", src, "--output", dst, "--quiet"], capsys)
    finally:
        os.close(lock)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert "is being written by another palitorch batch" in err and "choose another --output" in err
    assert not dst.exists()
    rc, _, err = cli(["batch", "--input", src, "--output", dst, "--quiet"], capsys)  # the lock file is left
    assert rc == 0, err  # (by a run that was killed: the kernel dropped its lock)
    assert indices(dst) == list(range(1, 8)) and not (images.parent / "out.jsonl.lock").exists()


def open_files() -> int:
    return len(os.listdir("/dev/fd"))


def test_the_output_lock_is_one_run_s_and_leaves_nothing_behind(tmp_path):
    """flock locks of two opens of one file conflict, in one process as in two: the second is refused, and neither
    leaves its lock file or a descriptor open."""
    out, lock = tmp_path / "out.jsonl", tmp_path / "out.jsonl.lock"
    before = open_files()
    with results.output_lock(out):
        assert lock.exists()
        with pytest.raises(InputError, match="is being written by another palitorch batch"):
            with results.output_lock(out):
                pass
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # (not a shared lock, which a second would share)
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not lock.exists() and open_files() == before
    with results.output_lock(out):  # and again
        pass
    assert not lock.exists() and open_files() == before


def test_a_lock_file_removed_as_it_is_taken_is_taken_anew(tmp_path, monkeypatch):
    """The run that held the lock removes its file as it ends: a run that opened that file just before locks a
    file no longer there (a third run would make and lock a new one beside it), so it locks the new one instead."""
    out, lock = tmp_path / "out.jsonl", tmp_path / "out.jsonl.lock"
    flock, calls = fcntl.flock, []

    def removed_first(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            lock.unlink()  # the other run ends between this one's open and its lock
        return flock(fd, operation)

    monkeypatch.setattr(results.fcntl, "flock", removed_first)
    with results.output_lock(out):
        assert len(calls) == 2 and lock.exists()
        with pytest.raises(InputError, match="is being written by another palitorch batch"):
            with results.output_lock(out):
                pass
    assert not lock.exists()


def test_a_run_that_takes_the_lock_as_another_ends_holds_a_lock_file_that_stays(tmp_path, monkeypatch):
    """A run ends by removing its lock file, then unlocking it: a run that takes the lock the moment it is free
    holds a file that stays (removed after, it would be held by no one's file, and a third run could lock a new
    one beside it)."""
    out, lock = tmp_path / "out.jsonl", tmp_path / "out.jsonl.lock"
    close, second = os.close, contextlib.ExitStack()
    state = {"ending": False, "taken": False}

    def then_another(fd):
        close(fd)
        if state["ending"] and not state["taken"]:  # the first run's lock is free: the second takes it at once
            state["taken"] = True
            second.enter_context(results.output_lock(out))

    monkeypatch.setattr(results.os, "close", then_another)
    with second:
        with results.output_lock(out):
            state["ending"] = True
        assert state["taken"] and lock.exists()
        with pytest.raises(InputError, match="is being written by another palitorch batch"):
            with results.output_lock(out):  # a third run
                pass
    assert not lock.exists()


def test_no_lock_where_the_folder_takes_no_new_file(tmp_path, monkeypatch):
    """(Then the run's own checks say what is wrong with the folder.)"""
    real = os.open

    def refused(path, *args, **kw):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(results.os, "open", refused)
    with results.output_lock(tmp_path / "out.jsonl"):
        pass


def full_disk(monkeypatch, when):
    """Make os.fsync fail as on a full disk for the calls `when(n, fd)` picks (n counts the calls from 1)."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if when(len(calls), fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(results.os, "fsync", fsync)


def test_a_full_disk_keeps_the_results_and_says_how_to_go_on(fake_pipe, images, monkeypatch, capsys):
    """The disk filled while the second batch was written: the line said "No space left on device" only; now it
    names the output, says the results written are kept and how to go on, and the next run finishes the rest."""
    src, dst = write_requests(images.parent / "requests.jsonl"), images.parent / "out.jsonl"
    fake_pipe(lambda image, prompt: "ok")
    full_disk(monkeypatch, lambda n, fd: n == 3)  # 1: the bad lines (none), 2: the first batch, 3: the second
    rc, out, err = cli(["batch", "--input", src, "--output", dst, "--batch-size", "2", "--quiet"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert f"--output {dst}: no space left on its device" in err and "results written so far are kept" in err
    assert "free some space and run the same command again" in err
    monkeypatch.undo()
    fake_pipe(lambda image, prompt: "ok")
    assert cli(["batch", "--input", src, "--output", dst, "--quiet"], capsys)[0] == 0
    assert indices(dst) == list(range(1, 8))  # each request once


def test_a_full_disk_at_the_rewrite_in_input_order_leaves_no_part_file(fake_pipe, images, monkeypatch, capsys):
    """Every answer was written, but the copy in input order did not fit: its half-written `.part` file stayed,
    holding the space; now it is removed and the output is as it was."""
    src, dst = write_requests(images.parent / "requests.jsonl"), images.parent / "out.jsonl"
    fake_pipe(lambda image, prompt: "ok")
    full_disk(monkeypatch, lambda n, fd: os.readlink(f"/proc/self/fd/{fd}").endswith(".part"))
    lines = src.read_text().splitlines()
    lines[1] = lines[1][:-1] + ', "max_new_tokens": 9}'  # a group of its own: written last, so out of order
    src.write_text("".join(line + "\n" for line in lines))
    rc, _, err = cli(["batch", "--input", src, "--output", dst, "--quiet"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "run the same command again" in err, err
    assert not (images.parent / "out.jsonl.part").exists()
    assert sorted(indices(dst)) == list(range(1, 8))


def test_an_interrupted_resumed_run_counts_the_earlier_results(fake_pipe, images, capsys):
    """Ctrl-C in a resumed run before it had written anything said "the 0 results written to OUT are kept", of an
    output holding the earlier run's answers: the count is of every result the output keeps."""
    src, dst = write_requests(images.parent / "requests.jsonl"), images.parent / "out.jsonl"

    def stop_at_3(image, prompt):
        if prompt == "caption 3":
            raise KeyboardInterrupt
        return "ok"

    fake_pipe(stop_at_3)
    rc, _, err = cli(["batch", "--input", src, "--output", dst, "--batch-size", "2"], capsys)
    assert rc == 130 and "the 2 results written to" in err, err
    rc, _, err = cli(["batch", "--input", src, "--output", dst, "--batch-size", "2"], capsys)
    assert rc == 130 and "the 2 results written to" in err, err
    assert indices(dst) == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["run", "--prompt", "detect x", "--draw", ""], "--draw is empty"),
    (["run", "--prompt", "segment x", "--draw", "o.png", "--vae", ""], "--vae is empty"),
    (["eval", "--data", "d.jsonl", "--predictions", ""], "--predictions is empty"),
    (["demo", "--out", ""], "--out is empty"),
])
def test_an_empty_path_is_refused_not_taken_for_no_option(argv, message, images, no_model_load, monkeypatch,
                                                          capsys):
    """`--draw "$OUT"` with OUT unset: the empty value read as no --draw (no picture, status 0), and `demo --out ""`
    wrote into the current folder; data, merge and --model already refused an empty path."""
    monkeypatch.chdir(images.parent)
    (images.parent / "d.jsonl").write_text(json.dumps({"image": "imgs/red.png", "prefix": "q", "suffix": "a"}) + "\n")
    monkeypatch.setattr("palitorch.cli.demo.load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    if argv[0] == "run":
        argv = [*argv, "--image", images / "red.png"]
    rc, out, err = cli(argv, capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err
