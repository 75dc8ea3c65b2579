"""[checkpoint] best over interruptions: a stop that skips the evaluation at a checkpoint's step, and a new run in a
folder that an earlier (unfinished) run left its best model in (train/best.py)."""

import json

import pytest

from palitorch.errors import Interrupted
from palitorch.train.loop import Trainer

from trainkit import config, crashing, make_data

OVER = {"train__steps": 8, "eval__every": 2, "eval__max_examples": 4, "eval__final_max_examples": 4,
        "checkpoint__every": 2, "checkpoint__keep": 10, "checkpoint__best": "exact_match"}
FIGURES = {2: 0.25, 4: 0.75, 6: 0.5, 8: 0.5}  # the periodic evaluation at step 4 is the best one
LAST = {**FIGURES, 8: 1.0}  # the last step's is


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


class Scripted(Trainer):
    """Evaluations with set figures (by step), and a SIGTERM during train_step(`stop_at`)."""
    stop_at, figures = -1, FIGURES

    def evaluate(self, final=False):
        return {"exact_match": self.figures[self.step], "n": 4, "eval_loss": 1.0}

    def train_step(self, step):
        if step == self.stop_at:
            self.request_stop("SIGTERM")
        return super().train_step(step)


def periodic(run):
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "eval" in r and not r.get("final")]


@pytest.mark.parametrize("stop_at, figures, over", [(3, FIGURES, {}), (7, LAST, {"eval__final_max_examples": 0})])
def test_an_evaluation_a_stop_skipped_at_the_checkpoint_is_done_on_resume(data, tmp_path, stop_at, figures, over):
    # the SIGTERM skips the evaluation due at the checkpoint it writes (at 4; at the last step, 8, the one of the
    # periodic subset): the resumed run starts after it, and must still count it
    cfg, scripted = {**OVER, **over}, type("Figures", (Scripted,), {"figures": figures})
    scripted(config(data, tmp_path / "whole", **cfg)).fit()
    whole = json.loads((tmp_path / "whole" / "best.json").read_text())
    part = tmp_path / "part"
    stopping = type("Stopping", (scripted,), {"stop_at": stop_at})
    with pytest.raises(Interrupted):
        stopping(config(data, part, **cfg)).fit()
    assert stop_at + 1 not in periodic(part)
    scripted(config(data, part, **cfg), resume=True).fit()
    assert json.loads((part / "best.json").read_text()) == whole
    assert periodic(part) == periodic(tmp_path / "whole")


def test_a_resume_after_the_evaluation_at_its_checkpoint_does_not_do_it_again(data, tmp_path):
    Crash = crashing(6, Scripted)  # after the evaluation at 6 (not the best): the checkpoint at 6 precedes it

    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        Crash(config(data, run, **OVER)).fit()
    Scripted(config(data, run, **OVER), resume=True).fit()
    assert periodic(run) == [2, 4, 6]
    assert json.loads((run / "best.json").read_text()) == {"metric": "exact_match", "step": 4, "value": 0.75}


def test_a_new_run_forgets_the_best_model_an_earlier_run_left(data, tmp_path):
    Crash = crashing(3)

    cfg = {**OVER, "checkpoint__best": "eval_loss", "eval__every": 4}
    whole = tmp_path / "whole"
    Trainer(config(data, whole, **cfg)).fit()
    run = tmp_path / "run"  # an earlier run stopped before its first checkpoint, after an evaluation at step 1
    (run / "best").mkdir(parents=True)
    (run / "config.toml").write_text("")
    (run / "best.json").write_text(json.dumps({"metric": "eval_loss", "step": 1, "value": 0.0}) + "\n")
    with pytest.raises(Interrupted):  # the new run's checkpoint at 2, before its first evaluation (4)
        Crash(config(data, run, **cfg)).fit()
    Trainer(config(data, run, **cfg), resume=True).fit()
    a, b = json.loads((whole / "best.json").read_text()), json.loads((run / "best.json").read_text())
    assert b["step"] == a["step"] and b["value"] == pytest.approx(a["value"], rel=1e-5)


def test_a_best_model_cut_between_its_two_renames_is_put_back(tmp_path):
    from palitorch.train import runfolder

    run = tmp_path / "run"  # best/ was renamed best.old/, the new one (a leftover) not yet renamed best/
    (run / "best.old").mkdir(parents=True)
    (run / "best.old" / "model.safetensors").write_text("kept")
    (run / ".best.abcd1234").mkdir()
    (run / "best.json").write_text("{}")
    runfolder.remove_leftovers(run)
    assert sorted(p.name for p in run.iterdir()) == ["best", "best.json"]
    assert (run / "best" / "model.safetensors").read_text() == "kept"
