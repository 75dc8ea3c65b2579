"""The run folder and --resume against what users meet: damaged checkpoints and metrics, foreign folders, leftovers
of a kill -9, a step count below the checkpoint's, Ctrl-C, SIGTERM, torchrun ranks and a run without a progress bar."""

import json
import os
import shutil
import signal
import tempfile

import pytest
import torch

import palitorch.checkpoint.io as io
from palitorch.checkpoint import load_model
from palitorch.cli import main
from palitorch.errors import CheckpointError, ConfigError, Interrupted
from palitorch.train import state
from palitorch.train.loop import Trainer

from trainkit import config, losses, make_data

OVER = {"train__steps": 4, "checkpoint__every": 2, "checkpoint__keep": 3, "eval__max_examples": 4,
        "eval__final_max_examples": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("base") / "run"
    Trainer(config(data, run, **OVER)).fit()
    return run


def copy_run(base, tmp_path):
    return shutil.copytree(base, tmp_path / "run")


def edit_state(**change):
    def edit(folder):
        st = json.loads((folder / "trainer_state.json").read_text())
        st.update(change)
        (folder / "trainer_state.json").write_text(json.dumps({k: v for k, v in st.items() if v is not None}))
    return edit


def cut(name, size):
    def edit(folder):
        with open(folder / name, "r+b") as f:
            f.truncate(size)
    return edit


DAMAGE = {
    "trainer_state cut short": cut("trainer_state.json", 20),
    "trainer_state a list": lambda f: (f / "trainer_state.json").write_text("[]"),
    "no step": edit_state(step=None),
    "no optimizer": edit_state(optimizer=None),
    "step a string": edit_state(step="4"),
    "optimizer cut short": cut("optimizer.safetensors", 1000),
    "rng empty": cut("rng_state.safetensors", 0),
    "model cut short": cut("model.safetensors", 1000),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_past_a_damaged_checkpoint(base, data, tmp_path, capsys, damage):
    run = copy_run(base, tmp_path)
    DAMAGE[damage](run / "checkpoint-0000004")
    trainer = Trainer(config(data, run, **OVER), resume=True)
    assert trainer.step == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint-0000004" in err[0] and "resuming from the older checkpoint-0000002" in err[0]
    assert "download" not in err[0]  # one's own checkpoint: nothing to download again
    assert [s for s, _ in state.checkpoints(run)] == [2]  # the damaged one is put aside, not deleted
    assert (run / "checkpoint-0000004.damaged" / "config.json").is_file()
    if damage == "model cut short":  # the resumed run reproduces the lost steps exactly
        trainer.fit()
        want, got = load_model(base / "model").state_dict(), load_model(run / "model").state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_resume_with_no_usable_checkpoint_names_the_damaged_file(base, data, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    cut("rng_state.safetensors", 0)(run / "checkpoint-0000004")
    cut("trainer_state.json", 30)(run / "checkpoint-0000002")
    with pytest.raises(CheckpointError, match=r"no checkpoint is usable: .*checkpoint-0000004.rng_state\.safetensors"
                                              r".*1 older one is damaged too"):
        Trainer(config(data, run, **OVER), resume=True)
    toml = tmp_path / "c.toml"
    toml.write_text(config(data, run, **OVER).to_toml())
    assert main(["train", str(toml), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "rng_state.safetensors" in err


def test_unreadable_metrics_lines_are_dropped_on_resume(base, data, tmp_path):
    run = copy_run(base, tmp_path)
    rows = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(rows + '{"step": 3, "lo\n[1]\n{"step": "x"}\n{"step": 5, "loss": 1.0}\n')
    Trainer(config(data, run, **OVER), resume=True)
    kept = (run / "metrics.jsonl").read_text()
    assert kept == rows  # the garbage lines and the row past step 4 are gone, every earlier row kept


def test_a_new_run_refuses_a_folder_that_is_not_a_run(base, data, tmp_path):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "mine.txt").write_text("the user's")
    (mine / "metrics.jsonl").write_text("the user's")
    with pytest.raises(ConfigError, match="not a palitorch run folder .*choose an empty or new folder"):
        Trainer(config(data, mine, **OVER))
    assert sorted(p.name for p in mine.rglob("*")) == ["metrics.jsonl", "mine.txt", "model"]  # untouched
    (mine / "config.toml").write_text("")
    (mine / "notes.txt").write_text("")
    with pytest.raises(ConfigError, match="holds 'notes.txt'"):
        Trainer(config(data, mine, **OVER))
    with pytest.raises(ConfigError, match="is a file"):
        Trainer(config(data, mine / "notes.txt", **OVER))
    with pytest.raises(ConfigError, match="pass --resume"):  # a finished run's folder: as before
        Trainer(config(data, base, **OVER))
    # A run stopped before its first checkpoint may be started again in its folder.
    again = tmp_path / "again"
    again.mkdir()
    for name in ("config.toml", "metrics.jsonl"):
        shutil.copy(base / name, again / name)
    shutil.copytree(base / "tokenizer", again / "tokenizer")
    Trainer(config(data, again, **OVER))
    assert not (again / "metrics.jsonl").exists()


def test_leftovers_of_interrupted_writes_are_removed(base, data, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    ours = [tempfile.mkdtemp(prefix=p, dir=run) for p in (".checkpoint-0000006.", ".state.", ".model.")]
    ours.append(tempfile.mkstemp(prefix=".metrics.jsonl.", dir=run)[1])
    (run / "checkpoint-0000002").rename(run / ".checkpoint-0000002.pruned")
    (run / ".checkpoint-0000006.notours").mkdir()
    (run / ".cache").mkdir()
    Trainer(config(data, run, **OVER), resume=True)
    names = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert names == [".cache", ".checkpoint-0000006.notours", ".lock"]  # (.lock: held by the trainer)
    assert "left by an interrupted write" in capsys.readouterr().err


def test_resume_refuses_fewer_steps_than_the_checkpoint(base, data, tmp_path):
    run = copy_run(base, tmp_path)
    with pytest.raises(ConfigError, match=r"at step 4, past this run's 2 steps .*--train.steps 6 for 2 more"):
        Trainer(config(data, run, **{**OVER, "train__steps": 2}), resume=True)
    assert (run / "model").is_dir() and load_model(run / "model") is not None  # model/ untouched


@pytest.mark.parametrize("change,message", [
    ({"model__vocab_size": 96}, r"built with \[model\] vocab_size 64, this run has 96: a resume goes on with the "),
    ({"model__image_size": 32}, r"\[model\] image_size 16, this run has 32"),
    ({"model__version": 2}, r"\[model\] version 1, this run has 2"),
    ({"model__init": "elsewhere"}, r"was built from scratch, this run has \[model\] init 'elsewhere'"),
])
def test_resume_refuses_a_changed_model(base, data, tmp_path, change, message):
    run = copy_run(base, tmp_path)  # (the checkpoint's model would be trained on, and config.toml describe another)
    with pytest.raises(ConfigError, match=message):
        Trainer(config(data, run, **{**OVER, "train__steps": 6, **change}), resume=True)
    Trainer(config(data, run, **{**OVER, "train__steps": 6, "model__dtype": "float32"}), resume=True)  # (unchanged)


def test_ctrl_c_says_how_to_go_on_and_keeps_checkpoints_whole(data, tmp_path, monkeypatch, capsys):
    class Crash(Trainer):
        def train_step(self, step):
            if step == 3:
                raise KeyboardInterrupt
            return super().train_step(step)

    with pytest.raises(Interrupted, match="after step 3 of 4; the last checkpoint is step 2: rerun with --resume"):
        Crash(config(data, tmp_path / "a", **OVER)).fit()
    with pytest.raises(Interrupted, match="before the first checkpoint: rerun without --resume"):
        Crash(config(data, tmp_path / "b", **{**OVER, "checkpoint__every": 0})).fit()

    # Ctrl-C while checkpoint-0000004 is being written: no trace of it, the older one whole, the CLI says one line.
    real = io.save_file

    def save_file(tensors, path, *args, **kw):
        if ".checkpoint-0000004." in path:
            raise KeyboardInterrupt
        return real(tensors, path, *args, **kw)

    monkeypatch.setattr(io, "save_file", save_file)
    toml = tmp_path / "c.toml"
    toml.write_text(config(data, tmp_path / "c", **OVER).to_toml())
    assert main(["train", str(toml)]) == 130
    err = capsys.readouterr().err
    assert err == "\npalitorch train: interrupted after step 4 of 4; the last checkpoint is step 2: rerun with " \
                  "--resume to continue from it\n"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".lock", "checkpoint-0000002", "config.toml",
                                                                  "metrics.jsonl", "tokenizer"]
    assert state.read(tmp_path / "c" / "checkpoint-0000002").step == 2


def test_only_the_first_torchrun_process_prints_an_error(data, tmp_path, monkeypatch, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text(config(data, tmp_path / "run", **OVER).to_toml())
    monkeypatch.setenv("RANK", "1")
    assert main(["train", str(toml), "--train.bogus", "1"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", str(toml), "--train.bogus", "1"]) == 2
    assert capsys.readouterr().err.startswith("palitorch train: error: [train] has no field 'bogus'")


def test_without_progress_bar_the_evaluations_and_summary_print(data, tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text(config(data, tmp_path / "run", **{**OVER, "eval__every": 2}).to_toml())  # progress = false
    assert main(["train", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "step 2: exact match" in out and "step 4: exact match" in out
    assert out.strip().splitlines()[-1].startswith("trained 4 steps (4 of 4 in all) in ")


def terminating(monkeypatch, at_step: int, times: int = 1):
    """Send this process SIGTERM `times` during training step `at_step` (0-based), as Slurm or docker stop do."""
    real = Trainer.train_step

    def train_step(self, step):
        if step == at_step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
        return real(self, step)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_sigterm_finishes_the_step_saves_a_checkpoint_and_resumes(data, tmp_path, monkeypatch, capfd,
                                                                  sigterm_guard):
    over = {**OVER, "checkpoint__every": 0}  # only the stop writes a checkpoint before the end
    toml = tmp_path / "c.toml"
    toml.write_text(config(data, tmp_path / "run", **over).to_toml())
    terminating(monkeypatch, at_step=1)
    assert main(["train", str(toml)]) == 143
    err = capfd.readouterr().err
    assert "SIGTERM: stopping after the step in progress, with a checkpoint there" in err
    assert err.endswith("palitorch train: stopped by SIGTERM after step 2 of 4; the last checkpoint is step 2: rerun "
                        "with --resume to continue from it\n")
    assert [s for s, _ in state.checkpoints(tmp_path / "run")] == [2]
    monkeypatch.undo()
    assert main(["train", str(toml), "--resume"]) == 0
    Trainer(config(data, tmp_path / "plain", **over)).fit()
    a, b = losses(tmp_path / "run"), losses(tmp_path / "plain")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a)  # the resumed run follows the uninterrupted one


def test_sigterm_during_an_evaluation_cuts_it_short(data, tmp_path, monkeypatch, capfd, sigterm_guard):
    import palitorch.train.evaluate as evaluate

    batches, real = [], evaluate.box_score

    def box_score(prediction, target):  # (called once per evaluated example)
        batches.append(1)
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(prediction, target)

    monkeypatch.setattr(evaluate, "box_score", box_score)
    over = {**OVER, "eval__every": 2, "eval__batch_size": 1, "checkpoint__every": 2}
    toml = tmp_path / "c.toml"
    toml.write_text(config(data, tmp_path / "run", **over).to_toml())
    assert main(["train", str(toml)]) == 143
    assert len(batches) == 2  # of the 4 examples (one per batch): the rest were not evaluated
    assert "stopped by SIGTERM after step 2 of 4; the last checkpoint is step 2" in capfd.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("eval" in r for r in rows)  # (figures of half an evaluation are not logged)


def test_a_second_sigterm_stops_at_once(data, tmp_path, monkeypatch, capfd, sigterm_guard):
    toml = tmp_path / "c.toml"
    toml.write_text(config(data, tmp_path / "run", **{**OVER, "checkpoint__every": 0}).to_toml())
    terminating(monkeypatch, at_step=1, times=2)
    assert main(["train", str(toml)]) == 143
    assert capfd.readouterr().err.endswith("palitorch train: stopped by SIGTERM after step 1 of 4, before the first "
                                           "checkpoint: rerun without --resume\n")
    assert state.checkpoints(tmp_path / "run") == []


def test_sigterm_before_training_stops_at_once(data, tmp_path, monkeypatch, capfd, sigterm_guard):
    toml = tmp_path / "c.toml"
    toml.write_text(config(data, tmp_path / "run", **OVER).to_toml())
    monkeypatch.setattr(Trainer, "warmstarts", lambda self: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["train", str(toml)]) == 143
    assert capfd.readouterr().err == "palitorch train: stopped by SIGTERM before training started\n"


@pytest.mark.parametrize("missing", state.STATE_FILES)
def test_a_checkpoint_folder_without_a_state_file_is_no_checkpoint(base, data, tmp_path, missing):
    """A checkpoint-NNNNNNN folder that lacks one of its state files (half copied by hand, a file deleted) is not
    one of the run's checkpoints: a resume goes on from the older complete one, and pruning does not count it."""
    run = copy_run(base, tmp_path)
    (run / "checkpoint-0000004" / missing).unlink()
    assert [s for s, _ in state.checkpoints(run)] == [2]
    assert Trainer(config(data, run, **OVER), resume=True).step == 2


def test_a_checkpoint_of_an_older_palitorch_is_checked_against_the_defaults_it_had():
    """Settings added after a checkpoint was written (per_image, late_from, late_examples) count as their value of
    then: a resume with per_image 2 from such a checkpoint would draw other batches, and is refused."""
    from palitorch.train import continuation

    saved = {"seed": 0, "batch_size": 4}
    now = {"seed": 0, "batch_size": 4, "per_image": 1, "late_from": 0, "late_examples": 0, "task_repeat": {}}
    continuation.check_identity(saved, now, "checkpoint-0000002")  # the defaults of then: accepted
    with pytest.raises(ConfigError, match=r"trained with per_image 1, this run has 2"):
        continuation.check_identity(saved, {**now, "per_image": 2}, "checkpoint-0000002")


def test_a_fine_tuning_run_resumes_whatever_its_from_scratch_keys_say():
    """A run fine-tuned from [model] init ignores the from-scratch keys (its model is the checkpoint's): changing one
    of them does not stop a resume; in a run built from scratch it does."""
    from types import SimpleNamespace

    from palitorch.train import continuation

    def cfg(init, image_size):
        keys = dict.fromkeys(continuation.SCRATCH_ONLY) | {"init": init, "image_size": image_size}
        return SimpleNamespace(model=SimpleNamespace(**keys))

    hub = "google/paligemma-3b-pt-224"
    continuation.check_model({"model": {"init": hub, "image_size": 224}}, cfg(hub, 448), "checkpoint-0000002")
    with pytest.raises(ConfigError, match=r"\[model\] image_size 224, this run has 448"):
        continuation.check_model({"model": {"image_size": 224}}, cfg("", 448), "checkpoint-0000002")


def test_a_new_run_refuses_a_finished_run_s_folder(tmp_path):
    """A folder with a finished run (config.toml and its model/): a new run there would replace that model."""
    from palitorch.train import runfolder

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.toml").write_text("")
    with pytest.raises(ConfigError, match=r"holds a finished run \(its model/\)"):
        runfolder.check_new_run(run)
    (run / "model").rmdir()
    runfolder.check_new_run(run)  # an interrupted run's folder (no model/ yet): may be started again


def test_a_generator_file_without_the_first_process_state_is_damaged(base, tmp_path):
    """rng_state.safetensors must hold torch.rank0 (the state a resume gives the first process): one without it is
    damaged, not a checkpoint that resumes with a fresh generator."""
    from safetensors.torch import save_file

    run = copy_run(base, tmp_path)
    folder = run / "checkpoint-0000004"
    save_file({"torch.rank1": torch.get_rng_state()}, str(folder / "rng_state.safetensors"))
    with pytest.raises(CheckpointError, match=r"rng_state\.safetensors is damaged \(no torch\.rank0"):
        state.read(folder)


def test_a_resume_between_metrics_rows_logs_the_uninterrupted_rows(data, tmp_path):
    """A checkpoint between two metrics rows (log_every 4, checkpoints every 3: a Ctrl-C or SIGTERM stop lands
    anywhere) carries the sums of the row in progress: the resumed run's row at step 4 averages steps 1-4, as the
    uninterrupted run's does, not 4 alone (losses equal to 1e-6, as every resume)."""
    over = {"train__steps": 8, "train__log_every": 4, "checkpoint__every": 3, "checkpoint__keep": 3,
            "eval__max_examples": 4, "eval__final_max_examples": 4}
    Trainer(config(data, tmp_path / "a", **over)).fit()

    class Crash(Trainer):
        def train_step(self, step):
            if step == 3:  # after the checkpoint at step 3, before the row at step 4
                raise KeyboardInterrupt
            return super().train_step(step)

    with pytest.raises(KeyboardInterrupt):
        Crash(config(data, tmp_path / "b", **over)).fit()
    Trainer(config(data, tmp_path / "b", **over), resume=True).fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [4, 8]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
