"""`palitorch data vqav2` and `coco-captions`: the official annotation layouts (as the VQA and COCO sites publish
them, in miniature) -> JSONL that `palitorch eval --metrics` and training read."""

import json
import shutil

import pytest
from conftest import cli  # tests/cli/conftest.py

from palitorch.assets import ASSETS_DIR as ASSETS
from palitorch.train.data import read_jsonl

ANSWERS = {1: ["green"] * 7 + ["teal"] * 2 + ["Green."], 2: ["circle"] * 9 + ["round"],
           3: ["yes"] * 10}


@pytest.fixture
def coco(tmp_path):
    """val2014/ with COCO-named copies of two bundled images; VQAv2 questions and annotations; COCO captions."""
    images = tmp_path / "val2014"
    images.mkdir()
    shutil.copy(ASSETS / "easyvqa_test_7.png", images / "COCO_val2014_000000000042.jpg")
    shutil.copy(ASSETS / "easyvqa_test_1.png", images / "COCO_val2014_000000000007.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color is the shape?", "question_id": 1},
        {"image_id": 7, "question": "What  shape is it?", "question_id": 2},
        {"image_id": 7, "question": "Is there a shape?", "question_id": 3},
        {"image_id": 9, "question": "Unanswered?", "question_id": 4}]}  # (no annotation: left out)
    annotations = {"annotations": [
        {"question_id": q, "image_id": 42 if q == 1 else 7, "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(ans)],
         "multiple_choice_answer": ans[0], "answer_type": "yes/no" if q == 3 else "other",
         "question_type": "what color" if q == 1 else "what"} for q, ans in ANSWERS.items()]}
    captions = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
                           {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"},
                           {"id": 8, "file_name": "COCO_val2014_000000000008.jpg"}],  # (no captions: left out)
                "annotations": [{"image_id": 42, "id": 1, "caption": "A green  shape."},
                                {"image_id": 7, "id": 2, "caption": "a circle"},
                                {"image_id": 42, "id": 3, "caption": "green triangle"}]}
    for name, data in (("q.json", questions), ("a.json", annotations), ("c.json", captions)):
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def vqa(coco, *extra):
    return ["data", "vqav2", "--questions", coco / "q.json", "--annotations", coco / "a.json", "--images",
            coco / "val2014", "--out", coco / "out" / "vqa.jsonl", *extra]


def test_vqav2_lines_carry_every_answer_and_eval_scores_them(coco, capsys):
    (coco / "out").mkdir()
    rc, out, err = cli(vqa(coco), capsys)
    assert rc == 0, err
    assert out.strip() == f"wrote 3 lines to {coco / 'out' / 'vqa.jsonl'}"
    lines = [json.loads(x) for x in (coco / "out" / "vqa.jsonl").read_text().splitlines()]
    assert lines[0] == {"image": "../val2014/COCO_val2014_000000000042.jpg", "prefix": "answer en What color is the "
                        "shape?", "suffix": "green", "answers": ANSWERS[1], "question_id": 1,
                        "answer_type": "other", "question_type": "what color"}
    assert lines[1]["prefix"] == "answer en What shape is it?" and lines[2]["answer_type"] == "yes/no"
    examples = read_jsonl(coco / "out" / "vqa.jsonl")  # the training layout, images found
    assert all(e.image.is_file() for e in examples)
    rc, out, err = cli(["eval", "--data", coco / "out" / "vqa.jsonl", "--metrics", "exact,vqa", "--group-by",
                        "answer_type", "--json", "--quiet", "--predictions", coco / "p.jsonl"], capsys)
    assert rc == 0, err
    m = json.loads(out)
    assert m["n"] == 3 and set(m["answer_type"]) == {"other", "yes/no"}
    from palitorch.tasks.metrics import vqa_accuracy

    predictions = [json.loads(x) for x in (coco / "p.jsonl").read_text().splitlines()]
    assert [p["vqa_accuracy"] for p in predictions] == [pytest.approx(vqa_accuracy(p["prediction"], p["answers"]))
                                                         for p in predictions]


def test_coco_captions_one_line_per_image_with_all_its_captions(coco, capsys):
    rc, out, err = cli(["data", "coco-captions", "--annotations", coco / "c.json", "--images", coco / "val2014",
                        "--out", coco / "cap.jsonl", "--lang", "de"], capsys)
    assert rc == 0, err
    lines = [json.loads(x) for x in (coco / "cap.jsonl").read_text().splitlines()]
    assert lines == [{"image": "val2014/COCO_val2014_000000000042.jpg", "prefix": "caption de",
                      "suffix": "A green shape.", "answers": ["A green shape.", "green triangle"], "image_id": 42},
                     {"image": "val2014/COCO_val2014_000000000007.jpg", "prefix": "caption de", "suffix": "a circle",
                      "answers": ["a circle"], "image_id": 7}]
    rc, out, err = cli(["eval", "--data", coco / "cap.jsonl", "--metrics", "cider", "--quiet"], capsys)
    assert rc == 0 and "CIDEr" in out, err
    # 2014 annotations over a folder of 2017's file names
    for p in (coco / "val2014").iterdir():
        p.rename(p.with_name(p.name.removeprefix("COCO_val2014_")))
    rc, out, err = cli(["data", "coco-captions", "--annotations", coco / "c.json", "--images", coco / "val2014",
                        "--out", coco / "cap.jsonl"], capsys)
    assert rc == 0, err
    assert [json.loads(x)["image"] for x in (coco / "cap.jsonl").read_text().splitlines()] == \
        ["val2014/000000000042.jpg", "val2014/000000000007.jpg"]


def test_a_question_that_is_not_text_is_named(coco, capsys):
    questions = json.loads((coco / "q.json").read_text())
    questions["questions"][1]["question"] = None
    (coco / "q.json").write_text(json.dumps(questions))
    (coco / "out").mkdir()
    rc, _, err = cli(vqa(coco), capsys)
    assert rc == 2 and err.count("\n") == 1
    assert 'a question needs "image_id", "question" (text) and "question_id": {"image_id": 7, "question": null' in err


def test_2017_names_limit_and_missing_images(coco, capsys):
    (coco / "val2014" / "COCO_val2014_000000000042.jpg").rename(coco / "val2014" / "000000000042.jpg")
    rc, _, err = cli(vqa(coco, "--limit", "1"), capsys)  # (out/ does not exist)
    assert rc == 2 and "its folder" in err and "does not exist" in err
    (coco / "out").mkdir()
    rc, _, err = cli(vqa(coco, "--limit", "1"), capsys)
    assert rc == 0, err
    line = json.loads((coco / "out" / "vqa.jsonl").read_text())
    assert line["image"] == "../val2014/000000000042.jpg"  # COCO 2017's file names
    (coco / "val2014" / "COCO_val2014_000000000007.jpg").unlink()
    rc, _, err = cli(vqa(coco), capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "2 of 3 images are not in" in err and "COCO_val2014_000000000007.jpg" in err and "--skip-missing" in err
    rc, out, err = cli(vqa(coco, "--skip-missing"), capsys)
    assert rc == 0 and "wrote 1 line to" in out, err


@pytest.mark.parametrize("swap, message", [
    (("--questions", "a.json"), '--questions {}/a.json has no "questions" list: is it the right file?'),
    (("--annotations", "c.json"), '--annotations {}/c.json has no answers to questions (entries with "question_id")'),
    (("--annotations", "nowhere.json"), "--annotations '{}/nowhere.json' does not exist"),
    (("--images", "q.json"), "--images '{}/q.json' is not a folder"),
    (("--out", "val2014"), "--out {}/val2014 is a folder: give a file name"),
    (("--limit", "0"), "--limit must be at least 1"),
])
def test_wrong_files_are_one_line_errors(coco, capsys, swap, message):
    argv = vqa(coco)
    value = coco / swap[1] if swap[0] != "--limit" else swap[1]
    if swap[0] in argv:
        argv[argv.index(swap[0]) + 1] = value
    else:
        argv += [swap[0], value]
    (coco / "out").mkdir()
    rc, _, err = cli(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and message.format(coco) in err, err
