"""`palitorch batch`'s promises on disk that an output read back afterwards cannot show: each batch's lines are
fsync'ed before the next batch runs, and a crash's last line, whole but without its newline, is kept (found by
mutation testing)."""

import json
import os

from conftest import cli  # tests/cli/conftest.py


def write_requests(path, n):
    lines = [{"image": "imgs/red.png" if i % 2 else "imgs/blue.png", "prompt": f"caption {i}"} for i in range(1, n + 1)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def answer(image, prompt):
    return f"{prompt} ({image.width}x{image.height})"


def test_each_batch_is_on_disk_before_the_next_one_runs(fake_pipe, images, monkeypatch, capsys):
    src, dst = write_requests(images.parent / "requests.jsonl", 7), images.parent / "out.jsonl"
    synced = []  # the output's line count at each fsync of it
    real = os.fsync

    def fsync(fd):
        if os.path.samefile(f"/proc/self/fd/{fd}", dst):
            synced.append(len(dst.read_bytes().splitlines()))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    pipe = fake_pipe(answer)
    generate = pipe.generate
    before = []  # the lines made durable when each batch starts

    def spy(image, prompt, **kw):
        before.append(synced[-1] if synced else 0)
        return generate(image, prompt, **kw)

    pipe.generate = spy
    assert cli(["batch", "--input", src, "--output", dst, "--batch-size", "3"], capsys)[0] == 0
    assert before == [0, 3, 6]  # batches of 3, 3 and 1: each started once the lines before it were synced
    assert synced[-1] == 7


def test_a_last_line_without_its_newline_is_kept_on_resume(fake_pipe, images, capsys):
    src, dst = write_requests(images.parent / "requests.jsonl", 4), images.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", src, "--output", dst, "--batch-size", "2"], capsys)[0] == 0
    lines = dst.read_text().splitlines()
    dst.write_text("\n".join(lines[:3]))  # the third line whole, its newline not written (or removed by an editor)
    pipe = fake_pipe(answer)
    assert cli(["batch", "--input", src, "--output", dst, "--batch-size", "2"], capsys)[0] == 0
    assert [p for c in pipe.calls for p in c[2]] == ["caption 4"]  # only the missing request runs
    assert dst.read_text().splitlines() == lines
