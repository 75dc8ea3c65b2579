"""`palitorch eval` on held-out examples about several images (`"image": [a, b]`): answered as
`Pipeline.generate([[a, b]], ...)` answers them, predictions written with their lists, one-line errors."""

import json
import re

import pytest
from conftest import cli  # tests/cli/conftest.py
from PIL import Image

import palitorch

from hf_factory import diverse

BOX = "<loc0010><loc0020><loc0500><loc0600> red"
LINES = [{"image": ["imgs/red.png", "imgs/blue.png"], "prefix": "caption en", "suffix": "two", "task": "pair"},
         {"image": "imgs/red.png", "prefix": "caption en", "suffix": "red", "task": "one"},
         {"image": ["imgs/blue.png", "imgs/red.png"], "prefix": "detect red", "suffix": BOX, "task": "pair"},
         {"image": ["imgs/red.png"], "prefix": "detect red", "suffix": BOX, "task": "one"}]


def test_eval_answers_a_list_of_images_as_the_pipeline(ckpt_factory, images, tmp_path, capsys):
    folder, _ = diverse(ckpt_factory, 1)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in LINES))
    (tmp_path / "out").mkdir()
    pred = tmp_path / "out" / "pred.jsonl"
    rc, out, err = cli(["eval", "--model", folder, "--data", tmp_path / "data.jsonl", "--json", "--quiet",
                        "--max-new-tokens", "6", "--predictions", pred], capsys)
    assert rc == 0, err
    m = json.loads(out)

    def load(p):
        return Image.open(tmp_path / p)

    rows = [[load(p) for p in x["image"]] if isinstance(x["image"], list) else load(x["image"]) for x in LINES]
    want = [r.text for r in palitorch.load(folder).generate(rows, [x["prefix"] for x in LINES], max_new_tokens=6)]
    got = [json.loads(x) for x in pred.read_text().splitlines()]
    assert [g["prediction"] for g in got] == want
    assert len(set(want)) > 1, "the rows' answers should differ"
    assert [g["image"] for g in got] == [["../imgs/red.png", "../imgs/blue.png"], "../imgs/red.png",
                                         ["../imgs/blue.png", "../imgs/red.png"], ["../imgs/red.png"]]
    assert m["n"] == 4 and m["task"]["pair"]["n"] == 2
    assert m["boxes"]["n"] == 1  # the detect example about one image; that about two has no box metric
    rc, out, err = cli(["eval", "--model", folder, "--data", pred, "--json", "--quiet", "--max-new-tokens", "6"],
                       capsys)  # the predictions read as data again
    assert rc == 0 and {**json.loads(out), "data": m["data"]} == m, err


@pytest.mark.parametrize("image, message", [
    (["imgs/red.png", "imgs/nope.png"], r"data.jsonl:2: image '.*imgs/nope.png' does not exist"),
    (["imgs/red.png", "imgs/broken.png"], r"data.jsonl:2: .*broken.png"),
    ([], r'data.jsonl:2: "image" is an empty list'),
])
def test_eval_refuses_a_bad_image_of_a_list_in_one_line(image, message, images, tmp_path, no_model_load, capsys):
    lines = [LINES[1], {**LINES[1], "image": image}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, _, err = cli(["eval", "--data", tmp_path / "data.jsonl"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert re.search(message, err), err
