"""[checkpoint] best: the model of the best periodic evaluation kept in RUN/best, over resumes too (train/best.py)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from palitorch.errors import ConfigError, Interrupted
from palitorch.train import ddp
from palitorch.train.best import Best
from palitorch.train.loop import Trainer

from trainkit import config, crashing, make_data

OVER = {"train__steps": 8, "eval__every": 2, "eval__max_examples": 4, "eval__final_max_examples": 4,
        "checkpoint__every": 2, "checkpoint__keep": 10, "checkpoint__best": "eval_loss", "optim__lr": 3e-3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def evaluations(run):
    """(step, eval row, final?) of every evaluation the run logged."""
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval"], r.get("final", False)) for r in rows if "eval" in r]


def test_the_best_model_by_eval_loss_is_the_checkpoint_of_its_step(data, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(config(data, run, **OVER)).fit()
    evals = evaluations(run)
    # the periodic ones at 2, 4, 6 and the final one at 8 cover the same 4 examples: all are candidates
    assert [(s, f) for s, _, f in evals] == [(2, False), (4, False), (6, False), (8, True)]
    step, value = min(((s, e["eval_loss"]) for s, e, _ in evals), key=lambda sv: sv[1])
    best = json.loads((run / "best.json").read_text())
    assert best == {"metric": "eval_loss", "step": step, "value": pytest.approx(value)}
    kept = load_file(run / "best" / "model.safetensors")
    saved = load_file(run / f"checkpoint-{step:07d}" / "model.safetensors")
    assert kept.keys() == saved.keys() and all((kept[k] == saved[k]).all() for k in kept)
    assert (run / "best" / "config.json").is_file() and (run / "best" / "tokenizer.json").is_file()
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    kept_rows = [r for r in rows if r.get("event") == "best"]
    assert kept_rows[-1] == {"step": step, "event": "best", "metric": "eval_loss", "value": pytest.approx(value)}
    assert [r["step"] for r in kept_rows] == sorted({r["step"] for r in kept_rows})  # each an improvement
    assert f"the best by eval_loss ({value:.4f}, step {step}) is in {run / 'best'}" in capsys.readouterr().out


def test_a_final_evaluation_of_other_examples_adds_one_of_the_periodic_subset(data, tmp_path):
    run = tmp_path / "run"
    Trainer(config(data, run, **{**OVER, "eval__final_max_examples": 0, "train__steps": 5})).fit()
    evals = evaluations(run)
    assert [(s, f, e["n"]) for s, e, f in evals] == [(2, False, 4), (4, False, 4), (5, False, 4), (5, True, 16)]
    step, _ = min(((s, e["eval_loss"]) for s, e, f in evals if not f), key=lambda sv: sv[1])
    assert json.loads((run / "best.json").read_text())["step"] == step


def test_a_resumed_run_keeps_the_best_the_interrupted_one_had_found(data, tmp_path):
    Crash = crashing(5)
    whole = tmp_path / "whole"
    Trainer(config(data, whole, **OVER)).fit()
    part = tmp_path / "part"
    with pytest.raises(Interrupted):  # after the evaluations at 2 and 4; the checkpoint at 4 precedes the latter
        Crash(config(data, part, **OVER)).fit()
    Trainer(config(data, part, **OVER), resume=True).fit()
    a, b = json.loads((whole / "best.json").read_text()), json.loads((part / "best.json").read_text())
    assert a["step"] == b["step"] and b["value"] == pytest.approx(a["value"], rel=1e-5)


class Run(SimpleNamespace):
    def log(self, row):
        self.rows.append(row)

    def _init_path(self):
        return None


def test_higher_is_better_but_lower_for_the_loss_and_ties_keep_the_first(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr("palitorch.train.state.save_model_folder", lambda model, folder, *a, **k: saved.append(folder))
    run = Run(step=0, dist=ddp.Dist(), model=None, tokenizer_files={}, rows=[])
    best = Best("cider", tmp_path)
    for step, value in ((1, 0.5), (2, 0.7), (3, 0.7), (4, 0.2)):
        run.step = step
        best.update(run, {"cider": value, "eval_loss": 1.0})
    assert (best.step, best.value) == (2, 0.7) and [r["step"] for r in run.rows] == [1, 2] and len(saved) == 2
    loss = Best("eval_loss", tmp_path)
    for step, value in ((1, 2.0), (2, 1.5), (3, 1.8)):
        run.step = step
        loss.update(run, {"eval_loss": value})
    assert (loss.step, loss.value) == (2, 1.5)
    off = Best("", tmp_path)
    assert not off.update(run, {"eval_loss": 0.1}) and off.closing() == ""
    other = Best("exact_match", tmp_path / "other")
    other.restore({"metric": "cider", "step": 3, "value": 9.0}, 4)  # a resumed run that changed metric: starts anew
    assert other.step is None


def test_a_resume_takes_best_json_up_to_its_checkpoint_else_the_checkpoints_own(tmp_path):
    (tmp_path / "best.json").write_text(json.dumps({"metric": "cider", "step": 4, "value": 1.5}))
    saved = {"metric": "cider", "step": 2, "value": 1.0}  # the checkpoint at 4 was written before the eval at 4
    best = Best("cider", tmp_path)
    best.restore(saved, 4)
    assert (best.step, best.value) == (4, 1.5)
    best = Best("cider", tmp_path)
    best.restore(saved, 3)  # best.json is of a step after the checkpoint's: steps the resumed run does again
    assert (best.step, best.value) == (2, 1.0)
    (tmp_path / "best.json").write_text("{")  # unreadable: the checkpoint's
    best = Best("cider", tmp_path)
    best.restore(saved, 4)
    assert (best.step, best.value) == (2, 1.0)


@pytest.mark.parametrize("over, message", [
    ({"checkpoint__best": "cider"}, "[checkpoint] best 'cider' is not a metric this run's evaluations report: one of "
                                    "exact_match, eval_loss (or add its measure to [eval] metrics, or [eval] vae "
                                    "for mask_iou)"),
    ({"checkpoint__best": "exact_match", "eval__every": 0}, "[checkpoint] best compares periodic evaluations"),
    ({"checkpoint__best": "exact_match", "data__eval": ""}, "give [data] eval and [eval] every > 0"),
])
def test_a_best_metric_must_be_one_the_evaluations_report(data, tmp_path, over, message):
    with pytest.raises(ConfigError) as e:
        config(data, tmp_path / "run", **{"eval__every": 2, **over})
    assert message in str(e.value)
    config(data, tmp_path / "run", eval__every=2, eval__metrics=["cider"], checkpoint__best="cider")  # reported


def test_the_best_folders_belong_to_a_run_and_their_half_writes_are_leftovers(tmp_path):
    import tempfile

    from palitorch.train import runfolder

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    for name in ("config.toml", "best.json", "best.json.part"):
        (run / name).write_text("")
    (run / "best.old").mkdir()  # (a replacement of best/ cut between its two renames)
    half = Path(tempfile.mkdtemp(prefix=".best.", dir=run))
    runfolder.check_new_run(run)  # a run stopped before its first checkpoint may start again there
    (run / ".best.notours").mkdir()
    assert runfolder.remove_leftovers(run) == sorted([half.name, "best.json.part"])
    assert sorted(p.name for p in run.iterdir()) == [".best.notours", "best", "best.json", "best.old", "config.toml"]
