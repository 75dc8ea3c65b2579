"""`palitorch run`: text, --stream, --json, --draw, and one-line errors checked before the model loads."""

import json
import os
import re

import numpy as np
import pytest
from conftest import cli, cli_subprocess  # tests/cli/conftest.py
from PIL import Image

import palitorch
import palitorch.assets
from palitorch.tasks.draw import MASK_ALPHA, label_colours
from palitorch.tasks.segmentation import vae_shapes


@pytest.fixture(scope="module")
def greedy(pg1):
    """The reference: what the pipeline itself answers (greedy, 6 tokens) for the red test image."""
    folder, _ = pg1
    pipe = palitorch.load(folder)

    def answer(image, prompt):
        return pipe.generate(Image.open(image), prompt, max_new_tokens=6)

    return answer


def test_json_matches_the_pipeline(pg1, images, greedy, capsys):
    folder, _ = pg1
    rc, out, err = cli(["run", "--model", folder, "--image", images / "red.png", "--prompt", "caption en",
                        "--max-new-tokens", "6", "--device", "cpu", "--json"], capsys)
    assert rc == 0, err
    got = json.loads(out)  # exactly one JSON object on stdout
    ref = greedy(images / "red.png", "caption en")
    assert got["text"] == ref.text and got["token_ids"] == ref.token_ids
    assert got["logprobs"] == pytest.approx(ref.logprobs, abs=1e-6)  # same arithmetic: 1e-6 is rounding slack
    assert got["finish_reason"] == ref.finish_reason and got["prompt_tokens"] == ref.prompt_tokens
    assert len(got["token_ids"]) == 6 and "detections" not in got


def test_plain_and_stream_print_the_text(pg1, images, greedy, capsys):
    folder, _ = pg1
    ref = greedy(images / "red.png", "caption en").text
    for extra in ([], ["--stream"]):
        rc, out, err = cli(["run", "--model", folder, "--image", images / "red.png", "--prompt", "caption en",
                            "--max-new-tokens", "6", *extra], capsys)
        assert rc == 0, err
        assert out == ref + "\n"


def test_end_to_end_subprocess_detect_json(pg1, images):
    folder, _ = pg1
    p = cli_subprocess(["run", "--model", folder, "--image", images / "red.png", "--prompt", "detect cat",
                        "--max-new-tokens", "4", "--json"])
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert set(got) == {"text", "token_ids", "logprobs", "finish_reason", "prompt_tokens", "detections"}
    assert isinstance(got["detections"], list) and len(got["token_ids"]) == 4


def test_draw_writes_boxes_and_labels(fake_pipe, images, tmp_path, capsys):
    pipe = fake_pipe(lambda im, p: "<loc0000><loc0000><loc0511><loc0511> cat ; <loc0600><loc0100><loc1023><loc0900> dog")  # noqa: E501
    out_png = tmp_path / "boxes.png"
    rc, out, err = cli(["run", "--image", images / "red.png", "--prompt", "detect cat ; dog", "--json",
                        "--draw", out_png], capsys)
    assert rc == 0, err
    assert pipe.calls[0][0] == "generate"
    got = json.loads(out)
    assert [d["label"] for d in got["detections"]] == ["cat", "dog"]
    assert got["detections"][0]["box"] == pytest.approx([0, 0, 511 / 1023 * 300, 511 / 1023 * 200], abs=0.01)
    drawn = Image.open(out_png)
    assert drawn.size == (300, 200)
    px = np.asarray(drawn.convert("RGB"))
    colours = label_colours(["cat", "dog"])
    assert tuple(px[150, 29]) == colours["dog"]  # left edge of the dog box: x = 100 / 1023 * 300 = 29.3
    assert tuple(px[60, 0]) == colours["cat"]  # the cat box starts at the left edge (x0 = 0)


def test_draw_without_boxes_writes_the_image_and_says_so(fake_pipe, images, tmp_path, capsys):
    fake_pipe(lambda im, p: "a red square")
    rc, out, err = cli(["run", "--image", images / "red.png", "--prompt", "caption en", "--draw",
                        tmp_path / "o.jpg"], capsys)
    assert rc == 0 and out == "a red square\n"
    assert "no boxes" in err and Image.open(tmp_path / "o.jpg").size == (300, 200)


@pytest.mark.skipif(not os.access("/proc", os.W_OK), reason="needs a folder that lets a write start and fail")
def test_a_draw_that_cannot_be_written_says_only_that(fake_pipe, images, capsys):
    fake_pipe(lambda im, p: "a red square")  # no boxes: "the image unchanged" would be false, the file is not there
    rc, out, err = cli(["run", "--image", images / "red.png", "--prompt", "caption en", "--draw", "/proc/x.png"],
                       capsys)
    assert rc == 2 and "cannot write /proc/x.png" in err and err.count("\n") == 1


def test_draw_onto_the_input_image_is_refused_before_it_runs(fake_pipe, images, capsys):
    pipe = fake_pipe(lambda im, p: "a red square")
    before = (images / "red.png").read_bytes()
    rc, out, err = cli(["run", "--image", images / "red.png", "--prompt", "detect x", "--draw", images / "red.png"],
                       capsys)
    assert rc == 2 and "must not be the input image" in err and err.count("\n") == 1
    assert (images / "red.png").read_bytes() == before and not pipe.calls


def test_draw_paints_segment_masks_with_a_vae(fake_pipe, images, tmp_path, capsys):
    # A VQ-VAE whose decoder outputs +1 everywhere (only the last bias is non-zero): the mask fills the box.
    shapes = vae_shapes(embed_dim=4)
    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    params["decoder.12.bias"][:] = 1
    np.savez(tmp_path / "vae.npz", **params)
    codes = "".join(f"<seg{i:03d}>" for i in range(16))
    # ... and an object without codes (a bare box, as a model may answer) keeps its box, drawn without a mask.
    answer = f"<loc0000><loc0000><loc0511><loc0511>{codes} cat ; <loc0700><loc0700><loc1023><loc1023> dog"
    fake_pipe(lambda im, p: answer)
    rc, _, err = cli(["run", "--image", images / "red.png", "--prompt", "segment cat", "--draw", tmp_path / "m.png",
                      "--vae", tmp_path / "vae.npz"], capsys)
    assert rc == 0, err
    px = np.asarray(Image.open(tmp_path / "m.png").convert("RGB")).astype(float)
    cat = np.array(label_colours(["cat"])["cat"], float)
    blend = (1 - MASK_ALPHA) * np.array([200, 30, 30]) + MASK_ALPHA * cat
    assert np.abs(px[70, 100] - blend).max() <= 1  # inside the box: tinted (uint8 rounding)
    assert tuple(px[150, 250]) == (200, 30, 30)  # outside: untouched
    dog = label_colours(["cat", "dog"])["dog"]
    assert tuple(px[185, round(300 * 700 / 1023)].astype(int)) == dog  # the dog's box: its left edge ...
    assert tuple(px[185, 250]) == (200, 30, 30)  # ... and no mask inside it


BAD = [
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "(0 means greedy), got inf"),
    (["--min-new-tokens", "100", "--max-new-tokens", "5"], "--min-new-tokens (100) is more than --max-new-tokens (5)"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["--top-k", "x"], "argument --top-k: invalid int value"),
    (["--num-beams", "2", "--temperature", "0.7"], "beam search is deterministic"),
    (["--num-beams", "100000"], "--num-beams must be an integer from 1 to 128"),  # (ran away with the memory)
    (["--stop", ""], "--stop must be a list of non-empty strings"),
    (["--device", "toaster"], "unknown device"),
    (["--dtype", "int8"], "unsupported dtype"),
    (["--draw", "/no/such/folder/out.png"], "does not exist"),
    (["--draw", f"{__file__}/out.png"], "test_run.py' is not a folder"),  # a file where the folder should be
    (["--draw", "out.unknownformat"], "unknown image format"),
    (["--draw", "out.psd"], "cannot write PSD images"),  # PIL reads PSD, but writes no PSD
    (["--draw", "out.xbm"], "cannot write XBM images"),  # XBM is black and white only
    (["--draw", "imgs.png"], "imgs.png is a folder"),  # made by the test
    (["--draw", "."], "--draw . is a folder: give a file name"),  # (was "unknown image format ''")
    (["--draw", "out.png", "--vae", "."], "'.' is a folder; give the file itself"),  # (was "do not exist")
    (["--device", "cpu:3"], "there is one cpu device"),
    (["--draw", "out.png", "--vae", "/no/vae.npz"], "do not exist"),
    (["--vae", "/no/vae.npz"], "give --draw OUT.png too"),
    (["--stream", "--json"], "not allowed with"),
    (["--stream", "--num-beams", "2"], "cannot stream"),
    (["--length-penalty", "2"], "--length-penalty applies to beam search only: add --num-beams"),  # was ignored
    (["--early-stopping", "true", "--num-beams", "1"], "--early-stopping applies to beam search only"),
    (["--seed", "3"], "--seed applies to sampling only: add --temperature T (T > 0)"),  # was greedy, silently
    (["--seed", "3", "--temperature", "0", "--top-k", "5"], "--seed applies to sampling only"),  # (T = 0: greedy)
    (["--seed", "3", "--num-beams", "2"], "--seed applies to sampling only"),
    (["--frobnicate"], "unrecognized arguments"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_fail_in_one_line_before_loading(extra, message, images, no_model_load, capsys, monkeypatch):
    monkeypatch.chdir(images.parent)
    (images.parent / "imgs.png").mkdir()
    rc, out, err = cli(["run", "--image", images / "red.png", "--prompt", "caption en", *extra], capsys)
    assert rc == 2 and out == ""
    # Unknown options are reported by the top-level parser ("palitorch: error: ..."), the rest by `run`'s.
    assert err.count("\n") == 1 and re.match(r"palitorch( run)?: error: ", err) and message in err, err


@pytest.mark.parametrize(("name", "why"), [("missing.png", "does not exist"), ("broken.png", "cannot read image"),
                                         (".", "is not a file"), ("https://example.com/cat.jpg", "is a URL: palitorch "
                                                                  "reads image files (download it first")])
def test_bad_image_fails_in_one_line_before_loading(name, why, images, no_model_load, capsys):
    rc, out, err = cli(["run", "--image", name if "://" in name else images / name, "--prompt", "caption en"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and why in err, err


def test_model_errors_are_one_line(pg1, images, tmp_path, monkeypatch, capsys):
    folder, _ = pg1
    long_prompt = "answer en " + "the " * 9000  # over the tiny model's 8192-token context
    monkeypatch.setattr(palitorch.assets, "DEFAULT_MODEL_DIR", tmp_path / "no_default_model")
    cases = [
        (["--model", folder, "--prompt", long_prompt], "over the model's context"),
        (["--model", tmp_path / "nowhere", "--prompt", "caption en"], "does not exist"),
        (["--prompt", "caption en"], "bundled default model is missing"),  # --model omitted
    ]
    for extra, message in cases:
        rc, out, err = cli(["run", "--image", images / "red.png", *extra], capsys)
        assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_bad_option_in_a_subprocess_has_no_traceback(images):
    p = cli_subprocess(["run", "--image", images / "red.png", "--prompt", "caption en", "--top-p", "0"])
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == "palitorch run: error: --top-p must be in (0, 1], got 0.0\n"


def test_top_logprobs_as_json_and_as_a_table(pg1, images, capsys):
    folder, _ = pg1
    pipe = palitorch.load(folder)
    ref = pipe.generate(Image.open(images / "red.png"), "caption en", max_new_tokens=4, top_logprobs=3)
    args = ["run", "--model", folder, "--image", images / "red.png", "--prompt", "caption en", "--max-new-tokens", "4",
            "--top-logprobs", "3"]
    rc, out, err = cli([*args, "--json"], capsys)
    assert rc == 0, err
    got = json.loads(out)["top_logprobs"]
    assert [[a["token_id"] for a in step] for step in got] == [[i for i, _ in step] for step in ref.top_logprobs]
    assert [[a["logprob"] for a in step] for step in got] == \
        [pytest.approx([v for _, v in step], abs=1e-6) for step in ref.top_logprobs]
    assert got[0][0]["token"] == pipe.processor.token_bytes(ref.top_logprobs[0][0][0]).decode(errors="replace")
    rc, out, err = cli(args, capsys)  # without --json: the answer, then a line per token
    assert rc == 0, err
    assert out.startswith(ref.text + "\n")
    table = out[len(ref.text) + 1:].splitlines()  # token texts are quoted there: "\n" stays on its line
    assert table[0].startswith("token") and len(table) == 1 + len(ref.token_ids)
    assert all(json.dumps(pipe.processor.decode([t])) in line and f"{lp:.3f}" in line
               for line, t, lp in zip(table[1:], ref.token_ids, ref.logprobs))


def test_chat_has_no_top_logprobs_flag(pg1, images, capsys):
    rc, _, err = cli(["chat", "--model", pg1[0], "--image", images / "red.png", "--top-logprobs", "2"], capsys)
    assert rc == 2 and "unrecognized arguments: --top-logprobs 2 (see palitorch chat --help)" in err


def test_text_values_may_start_with_a_dash(fake_pipe, images, capsys):
    """`--stop -x` and `--prompt -x` take "-x" as their text (argparse alone would read it as an option); a value
    forgotten before another option is still reported."""
    from palitorch.cli import attach_text_values

    pipe = fake_pipe(lambda im, p: "a - b")
    rc, out, err = cli(["run", "--image", images / "red.png", "--prompt", "-x caption", "--stop", "- ", "--stop",
                        "-y"], capsys)
    assert rc == 0, err
    assert pipe.calls[0][2] == ["-x caption"] and pipe.calls[0][3]["stop"] == ["- ", "-y"]
    rc, out, err = cli(["run", "--image", images / "red.png", "--prompt", "caption en", "--stop", "--json"], capsys)
    assert rc == 2 and "--stop" in err and "expected one argument" in err
    assert attach_text_values(["--stop", "-h", "--", "--stop", "-x"]) == ["--stop", "-h", "--", "--stop", "-x"]


def test_json_of_a_beam_search_lists_its_beams(pg1, images, capsys):
    folder, _ = pg1
    rc, out, err = cli(["run", "--model", folder, "--image", images / "red.png", "--prompt", "caption en",
                        "--max-new-tokens", "6", "--num-beams", "3", "--json"], capsys)
    assert rc == 0, err
    got = json.loads(out)
    want = palitorch.load(folder).generate(Image.open(images / "red.png"), "caption en", max_new_tokens=6,
                                          num_beams=3).beams
    assert [b["token_ids"] for b in got["beams"]] == [b.token_ids for b in want]
    assert got["beams"][0]["token_ids"] == got["token_ids"]
    assert [b["beam_score"] for b in got["beams"]] == pytest.approx([b.beam_score for b in want], abs=1e-6)
