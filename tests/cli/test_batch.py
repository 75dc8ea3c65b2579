"""`palitorch batch`: results and errors per line, batching by options, and a resumed run that loses nothing."""

import json

import pytest
from conftest import cli  # tests/cli/conftest.py
from PIL import Image

import palitorch
from palitorch.errors import InputError


def write_requests(path, lines):
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def read_results(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    indices = [r["index"] for r in records]
    assert len(indices) == len(set(indices)), "an index was written twice"
    return {r["index"]: r for r in records}


def test_real_model_with_bad_lines(pg1, images, capsys):
    folder, _ = pg1
    src = write_requests(images.parent / "requests.jsonl", [
        {"image": "imgs/red.png", "prompt": "caption en", "id": "a"},  # 1
        "{not json",  # 2
        {"image": "imgs/missing.png", "prompt": "caption en"},  # 3
        "",  # 4: blank lines are skipped
        {"image": "imgs/broken.png", "prompt": "caption en"},  # 5
        {"image": "imgs/blue.png", "prompt": "detect cat", "max_new_tokens": 3},  # 6
        {"image": "imgs/blue.png", "prompt": "caption en", "top_p": 0},  # 7
        {"image": "imgs/blue.png"},  # 8
        {"image": str(images / "blue.png"), "prompt": "caption en"},  # 9: absolute path
    ])
    dst = images.parent / "results.jsonl"
    rc, _, err = cli(["batch", "--model", folder, "--input", src, "--output", dst, "--max-new-tokens", "5",
                      "--batch-size", "2"], capsys)
    assert rc == 1, err  # every line written, some of them errors
    got = read_results(dst)
    assert sorted(got) == [1, 2, 3, 5, 6, 7, 8, 9]
    errors = {i: r["error"] for i, r in got.items() if "error" in r}
    assert set(errors) == {2, 3, 5, 7, 8}
    assert "not valid JSON" in errors[2] and "does not exist" in errors[3] and "cannot read image" in errors[5]
    assert all(e.startswith(f"line {i}") for i, e in errors.items()), errors  # the broken image's too
    assert "top_p must be in (0, 1]" in errors[7] and '"prompt"' in errors[8]
    assert got[7]["top_p"] == 0 and got[3]["image"] == "imgs/missing.png"  # error lines keep the request
    pipe = palitorch.load(folder)
    for i, image, prompt, n in ((1, "red", "caption en", 5), (6, "blue", "detect cat", 3), (9, "blue", "caption en", 5)):  # noqa: E501
        ref = pipe.generate(Image.open(images / f"{image}.png"), prompt, max_new_tokens=n)
        assert got[i]["text"] == ref.text and got[i]["token_ids"] == ref.token_ids, i
        assert got[i]["logprobs"] == pytest.approx(ref.logprobs, abs=1e-5)  # batched vs single: padding rounding
        assert got[i]["finish_reason"] == ref.finish_reason
    assert got[1]["id"] == "a" and got[6]["detections"] == [] and "detections" not in got[1]
    assert got[1]["decoding"] == {"max_new_tokens": 5} and got[6]["decoding"] == {"max_new_tokens": 3}
    assert "3 results and 5 errors" in err


def test_compiled_decode_gives_the_same_results(pg1, images, capsys):
    """--compile (torch.compile of the decode step) changes the speed, not the answers, also for the last chunk,
    which it pads to the batch size (4 requests in chunks of 3: the second runs as 3 rows)."""
    folder, _ = pg1
    src = write_requests(images.parent / "requests.jsonl", [
        {"image": f"imgs/{c}.png", "prompt": p} for c in ("red", "blue") for p in ("caption en", "detect cat")])
    out = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        dst = images.parent / f"{name}.jsonl"
        rc, _, err = cli(["batch", "--model", folder, "--input", src, "--output", dst, "--max-new-tokens", "6",
                          "--batch-size", "3", "--quiet", *extra], capsys)
        assert rc == 0, err
        out[name] = read_results(dst)
    for i, r in out["eager"].items():
        assert out["compiled"][i]["token_ids"] == r["token_ids"], i
        assert out["compiled"][i]["logprobs"] == pytest.approx(r["logprobs"], abs=1e-4)


def test_top_logprobs_per_line_and_by_default(pg1, images, capsys):
    """A line's "top_logprobs" option (or --top-logprobs for every line) adds each token's alternatives; a line that
    asks for none (0) has no such field."""
    folder, _ = pg1
    src = write_requests(images.parent / "requests.jsonl", [
        {"image": "imgs/red.png", "prompt": "caption en"}, {"image": "imgs/blue.png", "prompt": "caption en",
                                                            "top_logprobs": 3},
        {"image": "imgs/blue.png", "prompt": "detect cat", "top_logprobs": 0}])
    dst = images.parent / "results.jsonl"
    rc, _, err = cli(["batch", "--model", folder, "--input", src, "--output", dst, "--max-new-tokens", "4",
                      "--top-logprobs", "2", "--quiet"], capsys)
    assert rc == 0, err
    got = read_results(dst)
    pipe = palitorch.load(folder)
    for i, image, k in ((1, "red", 2), (2, "blue", 3)):
        ref = pipe.generate(Image.open(images / f"{image}.png"), "caption en", max_new_tokens=4, top_logprobs=k)
        assert got[i]["decoding"]["top_logprobs"] == k
        assert [[a["token_id"] for a in step] for step in got[i]["top_logprobs"]] == \
            [[t for t, _ in step] for step in ref.top_logprobs]
    assert "top_logprobs" not in got[3] and got[3]["decoding"]["top_logprobs"] == 0


@pytest.fixture
def requests_file(images):
    lines = [{"image": "imgs/red.png" if i % 2 else "imgs/blue.png", "prompt": f"caption {i}"} for i in range(1, 8)]
    lines[3]["max_new_tokens"] = 9  # request 4 runs in a group of its own
    return write_requests(images.parent / "requests.jsonl", lines)


def answer(image, prompt):
    return f"{prompt} ({image.width}x{image.height})"


def test_requests_are_batched_by_options(fake_pipe, requests_file, capsys):
    pipe = fake_pipe(answer)
    dst = requests_file.parent / "out.jsonl"
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "4", "--seed", "1"], capsys)
    assert rc == 0, err
    calls = [(c[2], c[3]) for c in pipe.calls]
    assert calls == [
        (["caption 1", "caption 2", "caption 3", "caption 5"], {"seed": 1}),
        (["caption 6", "caption 7"], {"seed": 1}),
        (["caption 4"], {"seed": 1, "max_new_tokens": 9}),
    ]
    got = read_results(dst)
    assert {i: r["text"] for i, r in got.items()} == {
        i: f"caption {i} ({'300x200' if i % 2 else '120x160'})" for i in range(1, 8)}


def test_compiled_greedy_chunks_are_padded_to_the_batch_size(fake_pipe, requests_file, capsys):
    """With --compile every greedy chunk runs at --batch-size rows (no new compilation for odd sizes): the
    padding repeats the chunk's last request, and only the real requests are written. Sampled chunks are not
    padded (their random draws depend on the batch)."""
    pipe = fake_pipe(answer)
    dst = requests_file.parent / "out.jsonl"
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "4", "--compile"], capsys)
    assert rc == 0, err
    assert [c[2] for c in pipe.calls] == [
        ["caption 1", "caption 2", "caption 3", "caption 5"],
        ["caption 6", "caption 7", "caption 7", "caption 7"],
        ["caption 4"] * 4,
    ]
    assert all(imgs[-1] is imgs[-2] for imgs in pipe.images[1:])  # the copies share the image
    got = read_results(dst)
    assert sorted(got) == list(range(1, 8)) and got[7]["text"] == "caption 7 (300x200)"

    pipe = fake_pipe(answer)
    dst.unlink()
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "4", "--compile",
                      "--temperature", "0.7"], capsys)
    assert rc == 0, err
    assert [len(c[2]) for c in pipe.calls] == [4, 2, 1]

    pipe = fake_pipe(answer)  # seeded samples run one by one: a line's seed gives its sample whatever the batch
    dst.unlink()
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "4", "--compile",
                      "--temperature", "0.7", "--seed", "1"], capsys)
    assert rc == 0, err
    assert [len(c[2]) for c in pipe.calls] == [1] * 7


def test_an_image_named_twice_is_read_once(fake_pipe, images, capsys):
    """Requests about the same file share one loaded image, which the pipeline then encodes once."""
    pipe = fake_pipe(answer)
    src = write_requests(images.parent / "requests.jsonl", [
        {"image": "imgs/red.png", "prompt": "caption 1"}, {"image": "imgs/blue.png", "prompt": "caption 2"},
        {"image": "imgs/red.png", "prompt": "caption 3"}])
    rc, _, err = cli(["batch", "--input", src, "--output", images.parent / "out.jsonl"], capsys)
    assert rc == 0, err
    (red, blue, red_again), = pipe.images
    assert red is red_again and red is not blue and red.size == (300, 200)


def test_resume_after_an_interruption_loses_nothing(fake_pipe, requests_file, capsys):
    dst = requests_file.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "2"], capsys)[0] == 0
    complete = dst.read_text()
    reference = read_results(dst)
    # A crash mid-write: three lines made it to disk, the fourth only half.
    lines = complete.splitlines(keepends=True)
    dst.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    pipe = fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "2"], capsys)
    assert rc == 0, err
    assert read_results(dst) == reference
    done_before = {json.loads(line)["prompt"] for line in lines[:3]}
    asked = [p for c in pipe.calls for p in c[2]]
    assert sorted(asked) == sorted({f"caption {i}" for i in range(1, 8)} - done_before)  # only the missing ones
    # A third run has nothing left to do and loads no model.
    pipe = fake_pipe(answer)
    assert cli(["batch", "--input", requests_file, "--output", dst], capsys)[0] == 0
    assert pipe.calls == [] and read_results(dst) == reference


def test_output_of_another_input_is_refused(fake_pipe, requests_file, capsys):
    dst = requests_file.parent / "out.jsonl"
    dst.write_text(json.dumps({"index": 1, "prompt": "something else", "text": "x"}) + "\n")
    fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst], capsys)
    assert rc == 2 and "holds results for another input" in err and err.count("\n") == 1


def test_output_of_a_longer_input_is_refused(fake_pipe, requests_file, capsys):
    """An output holding results past the input's last line (of a longer input) was resumed: its 7 answers kept, the
    summary "already there"."""
    dst = requests_file.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", requests_file, "--output", dst], capsys)[0] == 0
    short = write_requests(requests_file.parent / "short.jsonl", requests_file.read_text().splitlines()[:3])
    before = dst.read_text()
    rc, _, err = cli(["batch", "--input", short, "--output", dst], capsys)
    assert rc == 2 and "holds results for lines 4-7, which" in err and err.count("\n") == 1, err
    assert dst.read_text() == before


def test_a_batch_the_model_rejects_is_retried_one_by_one(fake_pipe, requests_file, capsys):
    def picky(image, prompt):
        if prompt == "caption 3":
            raise InputError("the prompt is too long")
        return "ok"

    pipe = fake_pipe(picky)
    dst = requests_file.parent / "out.jsonl"
    assert cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "3"], capsys)[0] == 1
    got = read_results(dst)
    assert got[3]["error"] == "line 3: the prompt is too long"  # every error names its line
    assert all(got[i]["text"] == "ok" for i in (1, 2, 4, 5, 6, 7))
    assert len(pipe.calls) > 3  # the failing batch of three was split into single calls


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--input", "nowhere.jsonl"], "does not exist"),
    (["--input", "."], "is not a file"),
    (["--output", __file__ + "/o.jsonl"], "test_batch.py' is not a folder"),
])
def test_bad_options_fail_in_one_line_before_loading(extra, message, requests_file, no_model_load, capsys):
    rc, out, err = cli(["batch", "--input", requests_file, "--output", requests_file.parent / "o.jsonl", *extra],
                       capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(("asked", "runs"), [(4, 4), (5, 4), (7, 6), (10, 8), (12, 12)])
def test_compiled_batches_use_a_size_the_pipeline_compiles_for(fake_pipe, requests_file, capsys, asked, runs):
    """A compiled pipeline runs greedy batches at 1, 2, 3, 4, 6, 8, 12, ... rows; --batch-size in between would run
    padded up to the next size on every chunk, so with --compile it is rounded down, and the user is told."""
    pipe = fake_pipe(answer)
    lines = [{"image": "imgs/red.png", "prompt": f"caption {i}"} for i in range(1, 14)]
    src = write_requests(requests_file.parent / "many.jsonl", lines)
    rc, _, err = cli(["batch", "--input", src, "--output", src.parent / "out.jsonl", "--batch-size", str(asked),
                      "--compile"], capsys)
    assert rc == 0, err
    assert {len(c[2]) for c in pipe.calls} == {runs}  # every chunk, the last one padded
    assert sum(len(c[2]) for c in pipe.calls) == runs * -(-13 // runs)
    assert (f"batches of {runs} instead of {asked}" in err) == (runs != asked)


def test_errors_run_again_and_answers_stay(fake_pipe, images, capsys):
    """On a rerun the lines that ended in an error run again (the missing image is there now); answers already
    written stay, each index once; the exit status says whether any request failed."""
    src = write_requests(images.parent / "requests.jsonl", [
        {"image": "imgs/red.png", "prompt": "caption 1"}, {"image": "imgs/later.png", "prompt": "caption 2"}])
    dst = images.parent / "out.jsonl"
    fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", src, "--output", dst], capsys)
    assert rc == 1 and "1 result and 1 error" in err and "does not exist" in read_results(dst)[2]["error"]
    Image.new("RGB", (50, 40)).save(images / "later.png")
    pipe = fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", src, "--output", dst], capsys)
    assert rc == 0 and "1 result and no errors" in err and "1 already there" in err
    assert [c[2] for c in pipe.calls] == [["caption 2"]]
    got = read_results(dst)
    assert got[2]["text"] == "caption 2 (50x40)" and got[1]["text"] == "caption 1 (300x200)"


def test_a_rerun_with_other_decoding_options_is_refused(fake_pipe, requests_file, capsys):
    """Answers made with other options are not passed off as this command's: the output records each line's
    decoding options, and a rerun that would mix them is refused, the output untouched."""
    dst = requests_file.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", requests_file, "--output", dst, "--max-new-tokens", "3"], capsys)[0] == 0
    before = dst.read_bytes()
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst], capsys)
    assert rc == 2 and "made with other decoding options" in err and err.count("\n") == 1
    assert dst.read_bytes() == before


def test_a_rerun_with_another_model_is_refused(fake_pipe, requests_file, capsys):
    """Each answer records the model that wrote it (folder, adapter, dtype): resuming with another is refused, so
    that one output never mixes two models' answers."""
    dst = requests_file.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", requests_file, "--output", dst], capsys)[0] == 0
    assert read_results(dst)[1]["generated_by"] == {"path": "palitorch-default", "dtype": "float32"}
    from palitorch.assets import DEFAULT_MODEL_DIR  # the bundled model named by its folder is the same model

    assert cli(["batch", "--input", requests_file, "--output", dst, "--model", DEFAULT_MODEL_DIR], capsys)[0] == 0
    before = dst.read_bytes()
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst, "--dtype", "bfloat16"], capsys)
    assert rc == 2 and "holds results of another model" in err and err.count("\n") == 1
    assert dst.read_bytes() == before


def test_an_unrelated_output_file_is_refused(fake_pipe, requests_file, capsys):
    dst = requests_file.parent / "notes.txt"
    dst.write_text("my precious notes\n")
    fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst], capsys)
    assert rc == 2 and "holds no results of palitorch batch" in err
    assert dst.read_text() == "my precious notes\n"


def test_a_misspelled_option_is_an_error_and_result_names_are_not_copied(fake_pipe, images, capsys):
    src = write_requests(images.parent / "requests.jsonl", [
        {"image": "imgs/red.png", "prompt": "caption 1", "temprature": 0.5},
        {"image": "imgs/red.png", "prompt": "caption 2", "id": 7, "error": "old", "text": "old"}])
    dst = images.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", src, "--output", dst], capsys)[0] == 1
    got = read_results(dst)
    assert "unknown field 'temprature'; did you mean the decoding option 'temperature'?" in got[1]["error"]
    assert got[2]["id"] == 7 and got[2]["text"] == "caption 2 (300x200)" and "error" not in got[2]


def test_other_tools_decoding_names_are_refused_not_ignored(fake_pipe, images, capsys):
    """Names the HTTP API or transformers use (max_tokens, ignore_eos, do_sample, ...) were kept as the request's own
    fields, the line answered with the defaults; now the line says what to write instead. `"n": 1` asks nothing."""
    src = write_requests(images.parent / "requests.jsonl", [
        {"image": "imgs/red.png", "prompt": "caption 1", "max_tokens": 3},
        {"image": "imgs/red.png", "prompt": "caption 2", "do_sample": True},
        {"image": "imgs/red.png", "prompt": "caption 3", "n": 2},
        {"image": "imgs/red.png", "prompt": "caption 4", "n": 1, "model": "exp-7"}])
    dst = images.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", src, "--output", dst], capsys)[0] == 1
    got = read_results(dst)
    assert "'max_tokens' is another tool's decoding option" in got[1]["error"] and '"max_new_tokens"' in got[1]["error"]
    assert '"temperature" (> 0 samples)' in got[2]["error"] and "one line per answer" in got[3]["error"]
    assert got[4]["text"] == "caption 4 (300x200)" and got[4]["n"] == 1
    assert got[4]["model"] == "exp-7"  # a request's own field, copied (palitorch's record is "generated_by")


def test_a_binary_input_is_refused(fake_pipe, images, capsys):
    fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", images / "red.png", "--output", images.parent / "out.jsonl"], capsys)
    assert rc == 2 and "is not text" in err and not (images.parent / "out.jsonl").exists()


def test_an_interrupted_run_says_what_it_kept(fake_pipe, requests_file, capsys):
    def stop_at_3(image, prompt):
        if prompt == "caption 3":
            raise KeyboardInterrupt  # Ctrl-C while the second batch runs
        return "ok"

    dst = requests_file.parent / "out.jsonl"
    fake_pipe(stop_at_3)
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "2"], capsys)
    assert rc == 130 and "interrupted; the 2 results written to" in err and "run the same command again" in err
    assert sorted(read_results(dst)) == [1, 2]


def test_sigterm_ends_a_run_as_ctrl_c_does(fake_pipe, requests_file, capsys, sigterm_guard):
    """Slurm's or docker's stop: the answers written are kept, the same line says how to go on, exit 143 (it ended
    with no line)."""
    import os
    import signal

    def stop_at_3(image, prompt):
        if prompt == "caption 3":
            os.kill(os.getpid(), signal.SIGTERM)
        return "ok"

    dst = requests_file.parent / "out.jsonl"
    fake_pipe(stop_at_3)
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "2"], capsys)
    assert rc == 143 and "interrupted; the 2 results written to" in err and "run the same command again" in err
    assert sorted(read_results(dst)) == [1, 2]  # (sigterm_guard: batch put the test's handler back)


def test_a_finished_output_is_in_input_order(fake_pipe, requests_file, capsys):
    """Option groups and errors are written as they complete; the finished file is in input order."""
    dst = requests_file.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", requests_file, "--output", dst, "--batch-size", "2"], capsys)[0] == 0
    assert [json.loads(line)["index"] for line in dst.read_text().splitlines()] == list(range(1, 8))


def test_an_unreadable_line_is_dropped_and_its_request_runs_again(fake_pipe, requests_file, capsys):
    dst = requests_file.parent / "out.jsonl"
    fake_pipe(answer)
    assert cli(["batch", "--input", requests_file, "--output", dst], capsys)[0] == 0
    lines = dst.read_text().splitlines()
    dst.write_text("\n".join([lines[0], "#### garbage ####", *lines[2:]]) + "\n")
    pipe = fake_pipe(answer)
    rc, _, err = cli(["batch", "--input", requests_file, "--output", dst], capsys)
    assert rc == 0 and "dropping an unreadable line" in err and [c[2] for c in pipe.calls] == [["caption 2"]]
    assert "garbage" not in dst.read_text() and sorted(read_results(dst)) == list(range(1, 8))
