"""`--quantize int8` on the command line: the bundled model answers through int8 decoder weights, and its held-out
answers stay those of the float model (the full test split: BENCHMARKS.md, session 32)."""

import json
from pathlib import Path

from run_cli import cli

from palitorch.inference.inputs import check_quantize

IMAGE = str(Path(__file__).resolve().parents[2] / "palitorch" / "assets" / "easyvqa_test_7.png")


def test_run_with_int8_weights_answers_as_the_float_model_does(capsys, monkeypatch):
    import palitorch

    loaded = []
    real = palitorch.load
    monkeypatch.setattr(palitorch, "load", lambda *a, **kw: loaded.append(kw.get("quantize")) or real(*a, **kw))
    answers = {}
    for extra in ([], ["--quantize", "int8"]):
        rc, out, err = cli(["run", "--image", IMAGE, "--prompt", "detect circle", "--json", *extra], capsys)
        assert rc == 0, err
        answers[bool(extra)] = json.loads(out)
    assert loaded == [None, "int8"]
    assert answers[True]["text"] == answers[False]["text"]
    assert answers[True]["token_ids"] == answers[False]["token_ids"]
    assert answers[True]["detections"] == answers[False]["detections"]
    gaps = [abs(a - b) for a, b in zip(answers[True]["logprobs"], answers[False]["logprobs"])]
    assert 0 < max(gaps) < 0.1, "int8 weights move the logprobs a little, not much"


def test_an_unknown_scheme_is_one_line_and_nothing_loads(capsys):
    rc, out, err = cli(["run", "--image", IMAGE, "--prompt", "caption en", "--quantize", "int4"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--quantize: invalid choice: 'int4' (choose from 'int8')" in err


def test_the_scheme_is_read_in_any_case():
    assert check_quantize("INT8") == "int8" and check_quantize(None) is None


def test_a_batch_output_says_its_weights_were_int8_and_is_not_resumed_by_another_model(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"image": IMAGE, "prompt": p}) + "\n"
                           for p in ("caption en", "detect circle")))
    rc, _, err = cli(["batch", "--input", src, "--output", out, "--quantize", "int8"], capsys)
    assert rc == 0, err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["generated_by"] for x in lines] == [{"path": "palitorch-default", "dtype": "float32",
                                                   "quantize": "int8"}] * 2
    src.write_text(src.read_text() + json.dumps({"image": IMAGE, "prompt": "ocr"}) + "\n")
    rc, _, err = cli(["batch", "--input", src, "--output", out], capsys)  # resumed without --quantize
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "holds results of another model" in err
