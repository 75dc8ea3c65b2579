"""`palitorch eval --given suffix`: the data's own answers scored against its "answers" lists (a ceiling figure,
e.g. VQAv2's most common answer against the ten), without a model."""

import json

import pytest
from conftest import cli  # tests/cli/conftest.py


def test_the_suffix_can_be_the_given_answer(tmp_path, no_model_load, capsys):
    rows = [{"image": "none.png", "prefix": "q1", "suffix": "2", "answers": ["2"] * 2 + ["3"] * 8},
            {"image": "none.png", "prefix": "q2", "suffix": "red", "answers": ["red"] * 10}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--given", "suffix", "--metrics", "vqa", "--json"],
                       capsys)
    assert rc == 0, err
    assert json.loads(out)["vqa_accuracy"] == pytest.approx((0.6 + 1.0) / 2)  # VQAv2: 2 of 10 humans
