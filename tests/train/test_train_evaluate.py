"""Evaluation: exact match overall and per group, box IoU, a fixed subset; the real greedy generate is used."""

import json
from pathlib import Path

import pytest
import torch

from palitorch.train import ddp
from palitorch.train.data import Example
from palitorch.train.evaluate import box_score, exact_match, group_metrics, subset, summary
from palitorch.train.loop import Trainer

from trainkit import config, make_data

BOX = "<loc0100><loc0100><loc0300><loc0300> circle"


def test_metrics_per_group_and_boxes():
    ex = [Example(Path("a"), "answer en q1", "yes", {"task": "vqa", "qtype": "yesno"}),
          Example(Path("b"), "answer en q2", "red", {"task": "vqa", "qtype": "color"}),
          Example(Path("c"), "caption en", "red circle", {"task": "caption"}),
          Example(Path("d"), "detect circle", BOX, {"task": "detect"})]
    answers = {"a": " yes ", "b": "blue", "c": "red  circle", "d": "<loc0100><loc0100><loc0300><loc0301> circle"}

    def fake_generate(images, prompts, max_new_tokens):
        return [answers[p.name] for p in images]

    stub = torch.nn.Linear(1, 1)  # stands in for the model: only its device and mode are used
    m = exact_match(stub, None, ex, [0, 1, 2, 3], 3, 8, ["task", "qtype"], ddp.Dist(), fake_generate)
    assert m["exact_match"] == 0.5 and m["n"] == 4  # whitespace is normalised; the box is one step off
    assert m["task"] == {"caption": {"exact_match": 1.0, "n": 1}, "detect": {"exact_match": 0.0, "n": 1},
                         "vqa": {"exact_match": 0.5, "n": 2}}
    assert m["qtype"]["yesno"]["exact_match"] == 1.0 and m["qtype"]["color"]["exact_match"] == 0.0
    assert m["boxes"]["n"] == 1 and m["boxes"]["label_and_iou50"] == 1.0
    assert m["boxes"]["mean_iou"] == pytest.approx(200 * 200 / (200 * 201))
    assert "mean IoU" in summary("step 5", {**m, "eval_loss": 1.0})



def test_groups_of_numbers_and_words_and_a_field_no_example_has():
    """A field's values are groups by their text, numbers beside words (JSON keys are text), in the text's order;
    a field no example has is left out (found by mutation testing)."""
    levels = [{"level": 2}, {"level": "hard"}, {"level": 10}, {"level": 2}, {}]
    ex = [Example(Path(str(i)), "q", "a", meta) for i, meta in enumerate(levels)]
    out = group_metrics(ex, {"exact": [1.0, 0.0, 1.0, 0.0, 1.0]}, ["level", "absent"])
    assert out == {"exact_match": 0.6, "n": 5, "level": {"10": {"exact_match": 1.0, "n": 1},
                                                          "2": {"exact_match": 0.5, "n": 2},
                                                          "hard": {"exact_match": 0.0, "n": 1}}}
    assert list(out["level"]) == ["10", "2", "hard"]

def test_box_score():
    assert box_score(BOX, BOX) == (1.0, 1.0)
    assert box_score("<loc0100><loc0100><loc0300><loc0300> square", BOX) == (1.0, 0.0)
    assert box_score("circle", BOX) == (0.0, 0.0)
    assert box_score("<loc0000><loc0000><loc0100><loc0100> circle", BOX) == (0.0, 1.0)


def test_subset_is_fixed_and_sorted():
    assert subset(10, 0, 0) == list(range(10)) and subset(10, 20, 0) == list(range(10))
    a = subset(100, 7, 3)
    assert a == subset(100, 7, 3) and a == sorted(a) and len(set(a)) == 7


def test_eval_through_the_real_pipeline(tmp_path):
    data = make_data(tmp_path / "data")
    trainer = Trainer(config(data, tmp_path / "run", eval__max_examples=5))
    m = trainer.evaluate()
    assert m["n"] == 5 and 0.0 <= m["exact_match"] <= 1.0 and m["eval_loss"] > 0
    assert sum(g["n"] for g in m["task"].values()) == 5
    assert trainer.model.training  # evaluation puts the model back in training mode


def test_a_run_reports_the_metrics_its_config_names(tmp_path):
    data = make_data(tmp_path / "data")
    trainer = Trainer(config(data, tmp_path / "run", eval__max_examples=5, eval__metrics=["anls", "cider"]))
    m = trainer.evaluate()
    assert m["n"] == 5 and "exact_match" not in m and 0.0 <= m["anls"] <= 1.0 and m["cider"] >= 0.0
    assert set(next(iter(m["task"].values()))) == {"anls", "cider", "n"}
    assert "ANLS" in summary("step 8", m) and "CIDEr" in summary("step 8", m)


def test_cider_over_two_processes_is_one_process_figure(monkeypatch):
    """CIDEr needs every answer: each process's answers travel as byte tensors summed over the processes (here the
    second process's sums are replayed into the first's), and the figure is that of one process answering all."""
    said = ["a red circle", "a blue squäre", "", "two green circles on white", "a circle"]
    refs = [["a red circle", "red circle"], ["a blue square"], ["a green triangle", "green triangle"],
            ["two green circles", "green circles on white"], ["a yellow circle"]]
    ex = [Example(Path(str(i)), "caption en", r[0], {"answers": r}) for i, r in enumerate(refs)]

    def gen(images, prompts, k):
        return [said[int(p.name)] for p in images]

    stub = torch.nn.Linear(1, 1)
    metrics = ["exact", "cider"]
    whole, scores = exact_match(stub, None, ex, list(range(5)), 2, 4, [], ddp.Dist(), gen, metrics=metrics), {}
    sums = []
    monkeypatch.setattr(ddp, "all_reduce_min", lambda t, d: torch.full_like(t, -64))  # the longest answer, at most
    monkeypatch.setattr(ddp, "all_reduce_sum", lambda t, d: sums.append(t.clone()) or t)
    exact_match(stub, None, ex, list(range(5)), 2, 4, [], ddp.Dist(1, 2), gen, metrics=metrics)
    theirs = iter(sums)
    monkeypatch.setattr(ddp, "all_reduce_sum", lambda t, d: t + next(theirs))
    two = exact_match(stub, None, ex, list(range(5)), 2, 4, [], ddp.Dist(0, 2), gen, metrics=metrics,
                      per_example=scores)
    assert two == pytest.approx(whole) and whole["cider"] > 0 and whole["exact_match"] == 0.2
    assert len(scores["cider"]) == 5 and scores["exact"] == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_periodic_evaluation_without_an_eval_set_is_skipped(tmp_path, capsys):
    # [eval] every with no [data] eval: said once at the start, no evaluation rows, the run finishes (it raised
    # KeyError 'exact_match' at the first evaluation, losing the work since the last checkpoint, and again on resume).
    data = make_data(tmp_path / "data")
    Trainer(config(data, tmp_path / "run", data__eval="", eval__every=2, train__steps=5)).fit()
    err = capsys.readouterr().err
    assert err.count("no [data] eval set: the evaluations every 2 steps ([eval] every) are skipped") == 1
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "eval" in r] and rows[-1]["event"] == "done"


def test_summary_says_what_the_metrics_hold():
    assert summary("step 3", {}) == "step 3: no evaluation metrics"
    assert summary("step 3", {"eval_loss": 1.5}) == "step 3: eval loss 1.5000"
    assert summary("step 3", {"exact_match": 0.5, "n": 4, "eval_loss": 1.5}) == \
        "step 3: exact match 0.5000 (n=4), eval loss 1.5000"
