"""`palitorch batch` at its edges: text it cannot write as UTF-8, paths it cannot read or write, outputs that are
not files, input files from other tools (a BOM, whole numbers written as 4.0), and a resume on changed images."""

import json
import os
from pathlib import Path

import pytest
from conftest import cli  # tests/cli/conftest.py

from palitorch.errors import InputError


def answer(image, prompt):
    return f"{prompt} ({image.width}x{image.height})"


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_results(path):
    return {r["index"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_lone_surrogates_are_kept_escaped_or_are_their_lines_error(fake_pipe, images, capsys):
    """JSON may hold a lone surrogate (\\ud800), which UTF-8 cannot: an "id" with one is written escaped, as it
    came; a prompt the model refuses (the processor's InputError) or an image path no file can have is that
    line's error, and the other lines run. A rerun finds everything in place."""

    def refuse_surrogates(image, prompt):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError("the text is not valid Unicode") from None
        return answer(image, prompt)

    src = write_lines(images.parent / "requests.jsonl", [
        r'{"image": "imgs/red.png", "prompt": "caption 1", "id": "\ud800"}',
        r'{"image": "imgs/red.png", "prompt": "caption \ud800"}',
        r'{"image": "imgs/\ud800.png", "prompt": "caption 3"}',
        r'{"image": "imgs/blue.png", "prompt": "caption 4"}'])
    dst = images.parent / "out.jsonl"
    fake_pipe(refuse_surrogates)
    rc, _, err = cli(["batch", "--input", src, "--output", dst, "--batch-size", "4"], capsys)
    assert rc == 1 and "2 results and 2 errors" in err, err
    got = read_results(dst)
    assert got[1]["id"] == "\ud800" and got[1]["text"] == "caption 1 (300x200)"
    assert got[2]["error"] == "line 2: the text is not valid Unicode" and got[2]["prompt"] == "caption \ud800"
    assert '"image" path is not valid Unicode' in got[3]["error"]
    assert got[4]["text"] == "caption 4 (120x160)"
    rc, _, err = cli(["batch", "--input", src, "--output", dst], capsys)
    assert rc == 1 and "2 already there" in err, err


def test_a_changed_image_is_refused_on_resume(fake_pipe, images, capsys):
    """An answer about another image is not passed off as this line's, as for a changed prompt."""
    src = write_lines(images.parent / "requests.jsonl", ['{"image": "imgs/red.png", "prompt": "caption en"}'])
    dst = images.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", src, "--output", dst], capsys)[0] == 0
    before = dst.read_bytes()
    write_lines(src, ['{"image": "imgs/blue.png", "prompt": "caption en"}'])
    rc, _, err = cli(["batch", "--input", src, "--output", dst], capsys)
    assert rc == 2 and "line 1's image differs" in err and err.count("\n") == 1, err
    assert dst.read_bytes() == before


def test_a_bom_and_whole_numbers_written_as_floats(fake_pipe, images, capsys):
    """Files from Windows tools start with a UTF-8 BOM; pandas writes integers as 4.0. Both are read as meant;
    4.5 is still no integer."""
    src = images.parent / "requests.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b'{"image": "imgs/red.png", "prompt": "caption 1", "max_new_tokens": 4.0}\n'
                    b'{"image": "imgs/red.png", "prompt": "caption 2", "max_new_tokens": 4.5, "seed": 2.0}\n')
    dst = images.parent / "out.jsonl"
    pipe = fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", src, "--output", dst], capsys)
    assert rc == 1, err
    got = read_results(dst)
    assert got[1]["text"] == "caption 1 (300x200)" and got[1]["decoding"] == {"max_new_tokens": 4}
    assert pipe.calls[0][3] == {"max_new_tokens": 4} and type(pipe.calls[0][3]["max_new_tokens"]) is int
    assert "max_new_tokens must be an integer >= 1, got 4.5" in got[2]["error"]
    assert cli(["batch", "--input", src, "--output", dst], capsys)[0] == 1  # the resume check agrees: 4 == 4


def test_an_output_that_is_not_a_file(fake_pipe, images, monkeypatch, capsys):
    """/dev/null (or a pipe) takes the lines as they come: no fsync (a device refuses it), no rewrite in order, no
    lock (its file would be made beside the device: in /dev, as root)."""
    import palitorch.cli.batch

    monkeypatch.setattr(palitorch.cli.batch, "output_lock", lambda output: pytest.fail(f"{output} was locked"))
    src = write_lines(images.parent / "requests.jsonl", ['{"image": "imgs/red.png", "prompt": "caption en"}'])
    pipe = fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", src, "--output", os.devnull], capsys)
    assert rc == 0 and "1 result and no errors" in err, err
    assert len(pipe.calls) == 1 and not Path(os.devnull + ".part").exists()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_files_in_dev_shm_are_files(fake_pipe, images, capsys):
    """/dev/shm holds ordinary files (tmpfs): its input takes image paths from its own folder, and its output is
    resumed and kept in input order (every path under /dev/ was taken for a stream: a rerun appended every answer
    again)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        shutil.copytree(images, folder / "imgs")
        src = write_lines(folder / "requests.jsonl", [
            json.dumps({"image": "imgs/red.png", "prompt": f"caption {i}"}) for i in range(3)])
        fake_pipe(answer)
        for _ in range(2):
            assert cli(["batch", "--input", src, "--output", folder / "out.jsonl"], capsys)[0] == 0
        lines = (folder / "out.jsonl").read_text().splitlines()
        assert [json.loads(line)["index"] for line in lines] == [1, 2, 3]
    finally:
        shutil.rmtree(folder)


NOT_CREATABLE = "/proc/1/x.jsonl"  # /proc takes no new files, not even from root


@pytest.mark.skipif(not Path("/proc/1").is_dir(), reason="needs Linux's /proc")
def test_an_output_that_cannot_be_created(images, no_model_load, capsys):
    src = write_lines(images.parent / "requests.jsonl", ['{"image": "imgs/red.png", "prompt": "caption en"}'])
    rc, out, err = cli(["batch", "--input", src, "--output", NOT_CREATABLE], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert f"--output {NOT_CREATABLE}: cannot write there (No such file or directory)" in err


def deny(monkeypatch, path: Path, method: str):
    """Make `path`'s Path.<method> (or open() of it) fail as for a user without the permission (tests run as root,
    which file modes do not stop)."""
    real = getattr(Path, method) if method != "open" else open

    def refused(*args, **kwargs):
        target = args[0]
        if Path(target).resolve() == path.resolve():
            raise PermissionError(13, "Permission denied", str(target))
        return real(*args, **kwargs)

    if method == "open":
        monkeypatch.setattr("palitorch.cli.results.open", refused, raising=False)
    else:
        monkeypatch.setattr(Path, method, refused)


@pytest.mark.parametrize("what", ["input", "output", "output folder"])
def test_unreadable_or_unwritable_paths_are_one_line(what, images, no_model_load, monkeypatch, capsys):
    src = write_lines(images.parent / "requests.jsonl", ['{"image": "imgs/red.png", "prompt": "caption en"}'])
    dst = images.parent / "out.jsonl"
    message = {"input": "cannot read the input file", "output": "cannot write it (Permission denied)",
               "output folder": "cannot write in its folder"}[what]
    if what == "input":
        deny(monkeypatch, src, "read_bytes")
    else:
        dst.write_text("")  # an existing output: checked before any work
        if what == "output":
            deny(monkeypatch, dst, "open")
        else:
            monkeypatch.setattr("palitorch.cli.results.os.access", lambda path, mode: Path(path) != dst.parent)
    rc, out, err = cli(["batch", "--input", src, "--output", dst], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_an_output_through_a_link(fake_pipe, images, capsys):
    """A link to a results file updates that file (the rewrite in input order used to replace the link with a
    file of its own, leaving the target with the unsorted lines), and a rerun through the link resumes."""
    src = write_lines(images.parent / "requests.jsonl", [  # line 2's error is written first: a rewrite in order
        '{"image": "imgs/red.png", "prompt": "caption 1"}', '{"image": "imgs/missing.png", "prompt": "caption 2"}'])
    real, link = images.parent / "real.jsonl", images.parent / "link.jsonl"
    link.symlink_to(real.name)
    fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", src, "--output", link], capsys)
    assert rc == 1 and link.is_symlink(), err
    assert [r["index"] for r in map(json.loads, real.read_text().splitlines())] == [1, 2]
    rc, _, err = cli(["batch", "--input", src, "--output", link], capsys)
    assert "1 already there" in err and link.is_symlink()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_standard_output_through_dev_or_proc_is_a_stream(fake_pipe, images, capsys, tmp_path):
    """/dev/stdout with stdout sent to a file (`--output /dev/stdout > out.jsonl`), seen here as a link to
    /proc/self/fd/N: the lines go to the descriptor as they come, nothing is read back or rewritten, and the link
    stays a link (as root, the rewrite replaced the system's /dev/stdout with a file). `-` is standard output."""
    src = write_lines(images.parent / "requests.jsonl", ['{"image": "imgs/red.png", "prompt": "caption en"}'])
    fake_pipe(answer)
    with open(tmp_path / "redirected.jsonl", "wb") as f:
        link = tmp_path / "stdout"
        link.symlink_to(f"/proc/self/fd/{f.fileno()}")
        for _ in range(2):  # twice: a stream is never resumed
            rc, _, err = cli(["batch", "--input", src, "--output", link], capsys)
            assert rc == 0 and "1 result and" in err and link.is_symlink(), err
    assert [r["index"] for r in map(json.loads, (tmp_path / "redirected.jsonl").read_text().splitlines())] == [1, 1]
    from palitorch.cli.results import output_target

    assert output_target("-") == (Path("/dev/stdout"), True) and output_target(link)[1]


def test_an_output_named_as_a_folder_is_refused(images, no_model_load, capsys):
    """`--output results/` (a trailing slash, a folder that does not exist yet) wrote a file named `results`."""
    src = write_lines(images.parent / "requests.jsonl", ['{"image": "imgs/red.png", "prompt": "caption en"}'])
    rc, _, err = cli(["batch", "--input", src, "--output", f"{images.parent}/results/"], capsys)
    assert rc == 2 and "is a folder: give a file name" in err and not (images.parent / "results").exists()


def test_own_fields_null_options_and_non_json_constants(fake_pipe, images, capsys):
    """Short fields of the user's own near an option's name are kept (step, speed, seed_id were taken for typos of
    stop and seed); a decoding option set to null is unset, as pandas writes a missing value; NaN is not JSON, so a
    line holding it is refused rather than copied into the output for stricter parsers to choke on."""
    src = write_lines(images.parent / "requests.jsonl", [json.dumps(x) if isinstance(x, dict) else x for x in [
        {"image": "imgs/red.png", "prompt": "caption 1", "step": 3, "speed": 1, "seed_id": "a", "top": 2},
        {"image": "imgs/red.png", "prompt": "caption 2", "max_new_tokens": None, "temperature": None},
        '{"image": "imgs/red.png", "prompt": "caption 3", "score": NaN, "w": 1e400}',
        {"image": "https://example.com/cat.jpg", "prompt": "caption 4"},
        '{"image": "imgs/red.png", "prompt": "caption 5", "w": 1e400}',
        {"image": "imgs/red.png", "prompt": "caption 6", "top-k": 3},
        {"image": "imgs/red.png", "prompt": "caption 7", "Seed": 3}]])
    dst = images.parent / "out.jsonl"
    pipe = fake_pipe(answer)
    assert cli(["batch", "--input", src, "--output", dst], capsys)[0] == 1
    got = read_results(dst)
    assert "error" not in got[1] and (got[1]["step"], got[1]["speed"], got[1]["seed_id"]) == (3, 1, "a")
    assert "error" not in got[2] and got[2]["decoding"] == {}
    assert "line 3 is not valid JSON: NaN is not a JSON value" in got[3]["error"]
    assert "score" not in got[3] and sum(len(c[2]) for c in pipe.calls) == 2
    assert 'line 4: the "image" is a URL: palitorch batch reads image files' in got[4]["error"]
    assert "line 5 is not valid JSON: 1e400 is beyond a float's range" in got[5]["error"]
    assert "unknown field 'top-k'; did you mean the decoding option 'top_k'?" in got[6]["error"]
    assert "unknown field 'Seed'; did you mean the decoding option 'seed'?" in got[7]["error"]
    # an output written before nulls were dropped (it recorded them) resumes: the same options
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    records[1]["decoding"] = {"max_new_tokens": None, "temperature": None}
    dst.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli(["batch", "--input", src, "--output", dst], capsys)[0] == 1  # (the bad lines fail again)
    assert read_results(dst)[1]["text"] == "caption 1 (300x200)"
