"""`palitorch eval`: the trainer's held-out metrics for any checkpoint and JSONL, with predictions and one-line
errors."""

import json
from pathlib import Path

import pytest
import torch
from conftest import cli  # tests/cli/conftest.py
from PIL import Image

import palitorch
from palitorch.assets import ASSETS_DIR as ASSETS
from palitorch.train.evaluate import box_score


def demo_jsonl(path):
    """The bundled demo examples as held-out data: a question, a caption and a box per image."""
    examples = json.loads((ASSETS / "demo.json").read_text())["examples"]
    lines = []
    for e in examples:
        image = str(ASSETS / e["image"])
        lines += [{"image": image, "prefix": f"answer en {e['question']}", "suffix": e["answer"], "task": "vqa"},
                  {"image": image, "prefix": "caption en", "suffix": e["caption"], "task": "caption"},
                  {"image": image, "prefix": e["detect"], "suffix": e["detection"], "task": "detect"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


def test_eval_measures_the_bundled_model_as_its_own_answers_say(tmp_path, capsys):
    lines = demo_jsonl(tmp_path / "test.jsonl")
    rc, out, err = cli(["eval", "--data", tmp_path / "test.jsonl", "--json", "--batch-size", "4", "--quiet",
                        "--predictions", tmp_path / "pred.jsonl"], capsys)
    assert rc == 0, err
    m = json.loads(out)
    pipe = palitorch.load()
    got = [pipe.generate(Image.open(x["image"]), x["prefix"], max_new_tokens=32).text for x in lines]
    right = [g == x["suffix"] for g, x in zip(got, lines)]
    assert m["n"] == len(lines) and m["exact_match"] == pytest.approx(sum(right) / len(lines))
    for task in ("vqa", "caption", "detect"):
        mine = [r for r, x in zip(right, lines) if x["task"] == task]
        assert m["task"][task] == {"exact_match": pytest.approx(sum(mine) / len(mine)), "n": len(mine)}
    boxes = [box_score(g, x["suffix"]) for g, x in zip(got, lines) if x["task"] == "detect"]
    assert m["boxes"]["n"] == len(boxes) and m["boxes"]["mean_iou"] == pytest.approx(
        sum(b[0] for b in boxes) / len(boxes))
    predictions = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in predictions] == got and [p["exact_match"] for p in predictions] == right
    assert predictions[0]["task"] == "vqa" and predictions[0]["suffix"] == lines[0]["suffix"]
    assert predictions[0]["image"] == lines[0]["image"]
    rc, out, _ = cli(["eval", "--data", tmp_path / "test.jsonl", "--max-examples", "5", "--quiet"], capsys)
    assert rc == 0 and out.startswith(f"{tmp_path / 'test.jsonl'}: exact match") and "(n=5)" in out


def test_eval_scores_what_the_model_answers(fake_pipe, images, tmp_path, capsys):
    pipe = fake_pipe(lambda im, p: {"q1": "red", "q2": "blue", "q3": "<loc0000><loc0000><loc0511><loc0511> cat",
                                    "q4": "green"}[p])
    pipe.model = torch.nn.Linear(1, 1)  # evaluation sets the model's mode and reads its device
    rows = [("q1", "red", "colour"), ("q2", "  red ", "colour"), ("q3", "<loc0000><loc0000><loc1023><loc1023> cat",
            "detect"), ("q4", "green", "shape")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": "imgs/red.png", "prefix": p, "suffix": s,
                                                          "kind": k}) + "\n" for p, s, k in rows))
    rc, out, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--group-by", "kind", "--json", "--quiet"], capsys)
    assert rc == 0, err
    m = json.loads(out)
    assert m["exact_match"] == 0.5 and m["kind"]["colour"] == {"exact_match": 0.5, "n": 2}
    assert m["boxes"] == {"n": 1, "mean_iou": pytest.approx(512 * 512 / 1023 ** 2, rel=1e-2), "label_and_iou50": 0.0}


def test_eval_metrics_compare_with_the_answers_lists(fake_pipe, images, tmp_path, capsys):
    """--metrics: each metric per example against the line's "answers" (its suffix where it has none), overall, per
    group and in the predictions; CIDEr for the whole set as tasks/metrics.cider gives it."""
    from palitorch.tasks.metrics import cider

    said = {"q1": "Two", "q2": "hallo", "q3": "a dog on a bench", "q4": "12.5"}
    pipe = fake_pipe(lambda im, p: said[p])
    pipe.model = torch.nn.Linear(1, 1)
    rows = [{"prefix": "q1", "suffix": "2", "answers": ["2"] * 2 + ["two"] * 2 + ["3"] * 6, "kind": "vqa"},
            {"prefix": "q2", "suffix": "hello", "kind": "doc"},
            {"prefix": "q3", "suffix": "a dog", "answers": ["a dog on a bench", "a dog sitting"], "kind": "cap"},
            {"prefix": "q4", "suffix": "12", "kind": "chart"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": "imgs/red.png", **r}) + "\n" for r in rows))
    rc, out, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--metrics", "exact,vqa,anls,relaxed,cider",
                        "--group-by", "kind", "--json", "--quiet", "--predictions", tmp_path / "p.jsonl"], capsys)
    assert rc == 0, err
    m = json.loads(out)
    # "Two" -> "2" (the references disagree): 4 of 10 match, each leave-one-out subset has 3 or 4: accuracy 1; the
    # caption matches one of two references: leaving it out 0, the other 1/3; "12.5": its one reference, exactly
    vqa = [1.0, 0.0, pytest.approx(1 / 6), 0.0]
    assert m["vqa_accuracy"] == pytest.approx(7 / 6 / 4) and m["kind"]["vqa"]["vqa_accuracy"] == 1.0
    # "Two" is "two" in lower case; "hallo" 1 of 5 characters off; "12.5" vs "12": 2 of 4, at the 0.5 threshold
    assert m["anls"] == pytest.approx((1 + 0.8 + 1 + 0) / 4)
    assert m["relaxed_accuracy"] == pytest.approx(3 / 4)  # "two", the caption, and 12.5 within 5% of 12
    assert m["exact_match"] == pytest.approx(1 / 4)  # the caption is one of its references
    each = cider([said[r["prefix"]] for r in rows], [r.get("answers", [r["suffix"]]) for r in rows])
    assert m["cider"] == pytest.approx(sum(each) / 4) and m["kind"]["cap"]["cider"] == pytest.approx(each[2])
    assert m["kind"]["doc"] == {"exact_match": 0.0, "vqa_accuracy": 0.0, "anls": pytest.approx(0.8),
                                "relaxed_accuracy": 0.0, "cider": pytest.approx(each[1]), "n": 1}
    predictions = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["vqa_accuracy"] for p in predictions] == vqa
    assert [p["relaxed_accuracy"] for p in predictions] == [True, False, True, True]
    # (true / false in the file, not 1.0 / 0.0)
    assert {type(p[k]) for p in predictions for k in ("exact_match", "relaxed_accuracy")} == {bool}
    assert [p["exact_match"] for p in predictions] == [False, False, True, False]
    assert predictions[0]["answers"] == rows[0]["answers"]
    rc, out, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--metrics", "vqa, anls", "--group-by", "kind",
                        "--quiet"], capsys)
    assert rc == 0 and out.splitlines()[0].endswith(": VQA accuracy 0.2917, ANLS 0.7000 (n=4)"), out
    assert "  kind: cap 0.1667 / 1.0000, chart 0.0000 / 0.0000, doc 0.0000 / 0.8000, vqa 1.0000 / 1.0000" in out


@pytest.mark.parametrize("answers", ["yes", [], ["yes", 3], {"a": 1}])
def test_an_answers_field_must_be_a_list_of_strings(answers, images, tmp_path, no_model_load, capsys):
    line = {"image": "imgs/red.png", "prefix": "q", "suffix": "a", "answers": answers}
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "imgs/red.png", "prefix": "q", "suffix": "a"}) + "\n" +
                                      json.dumps(line) + "\n")
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert 'd.jsonl:2: "answers" must be a non-empty list of strings' in err


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-examples", "-1"], "--max-examples must be >= 0"),
    (["--predictions", "nowhere/p.jsonl"], "does not exist"),
    (["--predictions", "/proc/p.jsonl"], "--predictions /proc/p.jsonl: cannot write there"),  # (was after the eval)
    (["--group-by", "kind,boxes"], "--group-by 'boxes' is the name of an overall metric"),
    (["--group-by", "n"], "--group-by 'n' is the name of an overall metric"),
    (["--group-by", "cider"], "--group-by 'cider' is the name of an overall metric"),
    (["--metrics", "vqa,cidr"], "--metrics: unknown metric 'cidr' (did you mean 'cider'?)"),
    (["--metrics", ","], "--metrics: name at least one of exact, vqa, anls, relaxed, cider"),
    (["--metrics", "anls,anls"], "--metrics: 'anls' is named twice"),
])
def test_eval_errors_are_one_line(extra, message, images, tmp_path, no_model_load, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "imgs/red.png", "prefix": "q", "suffix": "a"}) + "\n")
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl", *extra], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_eval_names_a_missing_image_before_loading(tmp_path, no_model_load, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "gone.png", "prefix": "q", "suffix": "a"}) + "\n")
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl"], capsys)
    assert rc == 2 and "d.jsonl:1" in err and "gone.png" in err and err.count("\n") == 1
    rc, _, err = cli(["eval", "--data", tmp_path / "none.jsonl"], capsys)
    assert rc == 2 and "does not exist" in err


def test_eval_reads_every_image_header_before_loading(tmp_path, images, no_model_load, capsys):
    """A damaged image or a folder is named with its line before the model loads (it ended the run when its batch
    came, the work before it lost)."""
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "dir.png").mkdir()
    lines = [{"image": str(images / "red.png"), "prefix": "q", "suffix": "a"}, {"image": "bad.png", "prefix": "q",
                                                                                 "suffix": "a"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl"], capsys)
    assert rc == 2 and "d.jsonl:2" in err and "not in a format Pillow can read" in err and err.count("\n") == 1
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "dir.png", "prefix": "q", "suffix": "a"}) + "\n")
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl"], capsys)
    assert rc == 2 and "dir.png' is a folder" in err


def eval_with_a_cut_image(fake_pipe, images, tmp_path, capsys, prefixes, *args):
    """`eval` on a good image's line, then one line per prefix giving the same truncated file -> (rc, stderr)."""
    pipe = fake_pipe(lambda im, p: "red")
    pipe.model = torch.nn.Linear(1, 1)
    whole = (images / "red.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    lines = [{"image": str(images / "red.png"), "prefix": "q", "suffix": "red"}]
    lines += [{"image": "cut.png", "prefix": p, "suffix": "red"} for p in prefixes]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--quiet", *args], capsys)
    return rc, err


def test_an_image_damaged_past_its_header_is_named_with_its_line(fake_pipe, images, tmp_path, capsys):
    """A truncated file passes the header check; when its turn comes the error still names its JSONL line."""
    rc, err = eval_with_a_cut_image(fake_pipe, images, tmp_path, capsys, ["q"])
    assert rc == 2 and "d.jsonl:2: cannot read image" in err and err.count("\n") == 1


def test_an_image_damaged_past_its_header_is_named_with_the_first_line_that_uses_it(fake_pipe, images, tmp_path,
                                                                                    capsys):
    """Several lines give the same truncated file: the error names the first of them (as a missing image is)."""
    rc, err = eval_with_a_cut_image(fake_pipe, images, tmp_path, capsys, ["q1", "q2", "q3"], "--batch-size", "4")
    assert rc == 2 and "d.jsonl:2: cannot read image" in err and err.count("\n") == 1


def test_predictions_through_a_link_or_into_a_pipe(tmp_path, capsys):
    """As batch's --output: a link to a file updates the file (the link was replaced by a file), and a FIFO is
    written into (it was replaced by a file, and its reader waited forever; as root, /dev/null alike)."""
    import os
    import threading

    demo_jsonl(tmp_path / "test.jsonl")
    args = ["eval", "--data", tmp_path / "test.jsonl", "--max-examples", "2", "--quiet", "--predictions"]
    (tmp_path / "target.jsonl").write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "target.jsonl")
    assert cli([*args, tmp_path / "link.jsonl"], capsys)[0] == 0
    assert (tmp_path / "link.jsonl").is_symlink() and len((tmp_path / "target.jsonl").read_text().splitlines()) == 2
    os.mkfifo(tmp_path / "fifo")
    read = []
    reader = threading.Thread(target=lambda: read.append((tmp_path / "fifo").read_text()), daemon=True)
    reader.start()
    assert cli([*args, tmp_path / "fifo"], capsys)[0] == 0
    reader.join(timeout=60)
    assert len(read[0].splitlines()) == 2 and not (tmp_path / "fifo").is_file()


def test_predictions_keep_the_data_fields_and_go_to_stdout_alone(tmp_path, capfd):
    """`--predictions -`: standard output holds the JSON lines only (the metrics go to stderr); each line keeps the
    example's fields as the data file writes them (a relative image path stays relative); answers longer than
    --max-new-tokens are warned of, as the trainer's evaluation warns."""
    import shutil
    import subprocess
    import sys

    lines = demo_jsonl(tmp_path / "abs.jsonl")
    (tmp_path / "imgs").mkdir()
    for x in lines:
        shutil.copy(x["image"], tmp_path / "imgs")
        x["image"] = "imgs/" + Path(x["image"]).name
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.run([sys.executable, "-m", "palitorch", "eval", "--data", str(tmp_path / "test.jsonl"),
                           "--max-examples", "6", "--quiet", "--json", "--predictions", "-", "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    predictions = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(predictions) == 6 and all(p["image"].startswith("imgs/") for p in predictions)
    metrics = json.loads(proc.stderr.strip().splitlines()[-1])
    assert metrics["n"] == 6
    processor = palitorch.load().processor
    longer = sum(sum(processor.encode(p["prefix"], p["suffix"]).types) - 1 > 2 for p in predictions)  # (- <eos>)
    assert longer and f"palitorch eval: warning: {longer} of the 6 eval answers are longer than --max-new-tokens (2 " \
                      "tokens" in proc.stderr


def test_an_answer_too_long_for_the_context_is_scored_not_refused(tmp_path, capsys):
    """Only the prefix is given to the model: a suffix longer than the context (or holding text no prompt may) is a
    wrong answer, counted in the cut-short warning, not an error that stops the evaluation."""
    lines = demo_jsonl(tmp_path / "test.jsonl")[:2]
    lines[0]["suffix"] = "red " * 600  # (the bundled model's context: 512 tokens)
    lines[1]["suffix"] = "an <image> here"
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, out, err = cli(["eval", "--data", tmp_path / "test.jsonl", "--json", "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads(out)["exact_match"] == 0 and "warning: 1 of the 2 eval answers are longer than" in err


def test_predictions_in_another_folder_read_as_data_and_stdout_to_them_keeps_the_metrics(tmp_path, capsys):
    """Relative image paths are rewritten relative to a predictions file in another folder, so that the predictions
    evaluate again as data; `--predictions F > F` (stdout sent to that file) prints the metrics to stderr, where
    they are not overwritten by the file's atomic replacement."""
    import shutil
    import subprocess
    import sys

    lines = demo_jsonl(tmp_path / "abs.jsonl")[:3]
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    for x in lines:
        shutil.copy(x["image"], tmp_path / "data" / "imgs")
        x["image"] = "imgs/" + Path(x["image"]).name
    (tmp_path / "data" / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "out").mkdir()
    pred = tmp_path / "out" / "pred.jsonl"
    assert cli(["eval", "--data", tmp_path / "data" / "test.jsonl", "--quiet", "--predictions", pred], capsys)[0] == 0
    assert [json.loads(x)["image"] for x in pred.read_text().splitlines()] == ["../data/" + x["image"] for x in lines]
    rc, out, err = cli(["eval", "--data", pred, "--quiet", "--json"], capsys)  # (the predictions as data)
    assert rc == 0 and json.loads(out)["n"] == 3, err
    data = str(tmp_path / "data" / "test.jsonl")
    with open(pred, "w") as stdout:
        proc = subprocess.run([sys.executable, "-m", "palitorch", "eval", "--data", data, "--quiet", "--json",
                               "--predictions", str(pred)], stdout=stdout, stderr=subprocess.PIPE, text=True,
                              timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stderr.strip().splitlines()[-1])["n"] == 3, proc.stderr
    assert len(pred.read_text().splitlines()) == 3


def test_eval_takes_the_seeds_subset_and_predictions_match_as_the_metrics_do(fake_pipe, images, tmp_path, capsys):
    """--seed chooses which --max-examples subset is taken (evaluate.subset); a prediction's exact_match field counts
    whitespace as the metrics do (found by mutation testing)."""
    from palitorch.train.evaluate import subset

    pipe = fake_pipe(lambda im, p: " red  " if p == "q0" else "blue")
    pipe.model = torch.nn.Linear(1, 1)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": "imgs/red.png", "prefix": f"q{i}",
                                                          "suffix": "red"}) + "\n" for i in range(10)))
    want = subset(10, 3, 5)
    assert want != subset(10, 3, 0)
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--max-examples", "3", "--seed", "5", "--quiet",
                      "--predictions", tmp_path / "p.jsonl"], capsys)
    assert rc == 0, err
    assert [p for c in pipe.calls for p in c[2]] == [f"q{i}" for i in want]
    rc, _, err = cli(["eval", "--data", tmp_path / "d.jsonl", "--quiet", "--predictions", tmp_path / "p.jsonl"],
                     capsys)
    assert rc == 0, err
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["exact_match"] for r in rows] == [True] + [False] * 9  # " red  " is "red" up to whitespace
