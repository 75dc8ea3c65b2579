"""`palitorch eval --given FIELD`: answers made elsewhere (or an earlier --predictions file's) scored without a model,
as the same answers generated are scored."""

import json

import pytest
import torch
from conftest import cli  # tests/cli/conftest.py

ROWS = [{"prefix": "q1", "suffix": "2", "answers": ["2"] * 4 + ["3"] * 6, "kind": "vqa"},
        {"prefix": "q2", "suffix": "hello", "kind": "doc"},
        {"prefix": "q3", "suffix": "a dog", "answers": ["a dog on a bench", "a dog sitting"], "kind": "cap"}]
SAID = {"q1": "two", "q2": "hallo", "q3": "a dog on a bench"}


def test_given_answers_score_as_generated_ones_and_rescore_a_predictions_file(fake_pipe, images, tmp_path, capsys):
    pipe = fake_pipe(lambda im, p: SAID[p])
    pipe.model = torch.nn.Linear(1, 1)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": "imgs/red.png", **r}) + "\n" for r in ROWS))
    metrics = ["--metrics", "exact,vqa,anls,cider", "--group-by", "kind", "--json", "--quiet"]
    rc, out, err = cli(["eval", "--data", tmp_path / "d.jsonl", *metrics, "--predictions", tmp_path / "p.jsonl"],
                       capsys)
    assert rc == 0, err
    generated = json.loads(out)
    # the predictions file, scored again: the same figures, no model (the images need not be there either)
    (tmp_path / "imgs" / "red.png").unlink()
    rc, out, err = cli(["eval", "--data", tmp_path / "p.jsonl", "--given", "prediction", *metrics,
                        "--predictions", tmp_path / "again.jsonl"], capsys)
    assert rc == 0, err
    assert {k: v for k, v in json.loads(out).items() if k != "data"} == \
        {k: v for k, v in generated.items() if k != "data"}
    first = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert again == first
    # other metrics: the earlier run's scores are not carried over as if they were this run's
    rc, out, err = cli(["eval", "--data", tmp_path / "p.jsonl", "--given", "prediction", "--metrics", "relaxed",
                        "--quiet", "--predictions", tmp_path / "relaxed.jsonl"], capsys)
    assert rc == 0, err
    lines = [json.loads(x) for x in (tmp_path / "relaxed.jsonl").read_text().splitlines()]
    assert [set(x) - set(ROWS[0]) - {"image", "answers"} for x in lines] == [{"prediction", "relaxed_accuracy"}] * 3


@pytest.mark.parametrize("extra, message", [
    (["--given", "answer"], "d.jsonl:1: --given 'answer': the line has no string field of that name (got null)"),
    (["--given", "n"], "d.jsonl:1: --given 'n': the line has no string field of that name (got 3)"),
    (["--given", "answer", "--model", "x"], "--given scores the answers the data holds: leave out --model"),
    (["--given", "answer", "--compile"], "--given scores the answers the data holds: leave out --compile"),
    (["--given", "answer", "--quantize", "int8"], "--given scores the answers the data holds: leave out --quantize"),
])
def test_given_errors_are_one_line(extra, message, tmp_path, no_model_load, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "none.png", "prefix": "q", "suffix": "a", "n": 3}) + "\n")
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl", *extra], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err
