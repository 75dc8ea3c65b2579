"""What a training run must not lose or get wrong silently, found by an audit: a diverging run, a resume with
changed settings, two processes in one run folder, a new run over a finished one, SIGTERM during an evaluation
that falls due, eval answers longer than the evaluation generates, and the generation caches kept after it."""

import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from palitorch.errors import ConfigError, NumericsError
from palitorch.train import evaluate, state
from palitorch.train.loop import Trainer

from trainkit import config

OVER = {"train__steps": 4, "checkpoint__every": 2, "checkpoint__keep": 1, "eval__max_examples": 4,
        "eval__final_max_examples": 4}


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 4-step run (checkpoint at step 4; keep 1)."""
    run = tmp_path_factory.mktemp("base") / "run"
    Trainer(config(data, run, **OVER)).fit()
    return run


def test_a_diverging_run_stops_with_its_last_good_checkpoint(data, tmp_path, monkeypatch):
    """A NaN loss at step 4 (here injected into the model's loss): one-line error, the update not applied, the
    checkpoint of step 2 kept (keep = 1 would have pruned it for NaN ones), no model/ written."""
    trainer = Trainer(config(data, tmp_path / "run", **OVER))
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    before = {}
    real = trainer.train_step

    def train_step(step):
        if step == 3:
            before.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        return real(step)

    monkeypatch.setattr(trainer, "train_step", train_step)
    with pytest.raises(NumericsError) as e:
        trainer.fit()
    message = str(e.value)
    assert "\n" not in message and message.startswith("training diverged at step 4: loss nan")
    assert "the last checkpoint, step 2, is intact: --resume" in message
    assert [s for s, _ in state.checkpoints(tmp_path / "run")] == [2]
    assert not (tmp_path / "run" / "model").exists()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())  # (the step is not applied)


def test_a_resume_applies_changed_optimizer_settings_by_name(finished, data, tmp_path, capsys):
    """weight_decay, betas, eps and lr_scale changed on a resume are the new config's, for the right parameters (the
    saved group settings were zipped onto the new groups by position, silently), and the resume says so."""
    run = shutil.copytree(finished, tmp_path / "run")
    changed = {**OVER, "train__steps": 6, "optim__weight_decay": 0.5, "optim__beta1": 0.5, "optim__eps": 1e-3,
               "optim__lr_scale": "{decoder = 0.1}"}
    trainer = Trainer(config(data, run, **changed), resume=True)
    err = capsys.readouterr().err
    assert "--resume: [optim] weight_decay 0.05 -> 0.5; beta1 0.9 -> 0.5; eps 1e-08 -> 0.001" in err
    assert "lr_scale {} -> {'decoder': 0.1} (from step 4 on)" in err
    names = iter(trainer.names)
    for group in trainer.opt.param_groups:
        assert group["betas"][0] == 0.5 and group["eps"] == 1e-3
        for p in group["params"]:
            name = next(names)
            assert group["lr_scale"] == (0.1 if name.startswith("language_model.") else 1.0), name
            assert group["weight_decay"] == (0.5 if p.ndim >= 2 else 0.0), name
            assert torch.count_nonzero(trainer.opt.state[p]["exp_avg_sq"]) > 0  # the moments came back
    trainer.fit()


def test_a_resume_refuses_a_changed_task_mix(finished, data, tmp_path):
    """[data] task_repeat decides the data order even when the example count stays the same."""
    run = shutil.copytree(finished, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"was trained with task_repeat \{\}, this run has \{'caption': 2\}"):
        Trainer(config(data, run, **{**OVER, "train__steps": 6, "data__task_repeat": "{caption = 2}"}), resume=True)
    # {caption = 1} is the default's data (one copy each), so it resumes
    Trainer(config(data, run, **{**OVER, "train__steps": 6, "data__task_repeat": "{caption = 1}"}), resume=True)


def test_a_run_folder_in_use_is_refused(data, tmp_path):
    """A second process in a run folder (a requeued job while the first still runs) is refused in one line."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 on node7'); f.flush()\n"
        "print('held', flush=True); time.sleep(60)"), str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=r"is in use by a palitorch train still running \(pid 4242 on node7\)"):
            Trainer(config(data, run, **OVER))
    finally:
        holder.kill()
        holder.wait()
    Trainer(config(data, run, **OVER))  # free again once the holder is gone


def test_a_new_run_does_not_replace_a_finished_one(finished, data, tmp_path):
    """A finished run whose checkpoints were deleted to save space, its model/ kept."""
    run = shutil.copytree(finished, tmp_path / "run")
    for _, folder in state.checkpoints(run):
        shutil.rmtree(folder)
    with pytest.raises(ConfigError, match="holds a finished run .its model/.: a new run there would replace it"):
        Trainer(config(data, run, **OVER))


def test_sigterm_skips_the_evaluation_that_falls_due(data, tmp_path, monkeypatch, capfd, sigterm_guard):
    """SIGTERM in step 2 of a run evaluating every 2 steps: the checkpoint is written and the run stops, without the
    evaluation (minutes on a real eval set, past Slurm's or docker's grace period before a SIGKILL)."""
    from palitorch.cli import main

    calls = []
    real_eval, real_step = Trainer.evaluate, Trainer.train_step

    def train_step(self, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "evaluate", lambda self, final=False: calls.append(final) or real_eval(self, final))
    monkeypatch.setattr(Trainer, "train_step", train_step)
    toml = tmp_path / "c.toml"
    toml.write_text(config(data, tmp_path / "run", **{**OVER, "eval__every": 2, "checkpoint__every": 0}).to_toml())
    started = time.perf_counter()
    assert main(["train", str(toml)]) == 143
    assert calls == [] and [s for s, _ in state.checkpoints(tmp_path / "run")] == [2]
    assert "stopped by SIGTERM after step 2 of 4" in capfd.readouterr().err
    assert time.perf_counter() - started < 600  # (a safety bound, not a measurement)


def test_eval_answers_longer_than_generated_are_named(data, tmp_path, capsys):
    trainer = Trainer(config(data, tmp_path / "run", **{**OVER, "eval__max_new_tokens": 2}))
    answers = trainer.eval_data.targets - 1
    over = int((answers > 2).sum())
    assert over > 0
    err = capsys.readouterr().err
    assert (f"warning: {over} of the {len(trainer.eval_data)} eval answers are longer than [eval] max_new_tokens (2 "
            f"tokens; the longest is {int(answers.max())}): they are cut short and count as wrong") in err
    assert evaluate.cut_answers(trainer.eval_data.targets - 1, int(answers.max())) is None
    assert torch.equal(evaluate.answer_tokens(trainer.processor, trainer.eval_examples), answers)


def test_the_evaluation_frees_its_kv_caches(data, tmp_path):
    """Training after an evaluation has the memory back (a 10B model's eval caches are ~24 GB)."""
    trainer = Trainer(config(data, tmp_path / "run", **OVER))
    result = trainer.evaluate()
    assert math.isfinite(result["eval_loss"])
    assert all(layer.attn.kv_cache is None for layer in trainer.model.language_model.layers)


def test_paths_expand_a_tilde_and_ignored_scratch_keys_are_named(data, base, tmp_path, monkeypatch, capsys):
    """`out = "~/runs/x"` is the home folder's (a folder named "~" was made), and a from-scratch key beside init
    (here the test config's 16 px image_size) is named as ignored: the checkpoint decides it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").symlink_to(base)
    cfg = config(data, "~/runs/x", **OVER, model__init="~/ckpt")
    assert (cfg.train.out, cfg.model.init) == (str(tmp_path / "runs" / "x"), str(tmp_path / "ckpt"))
    trainer = Trainer(cfg)
    assert trainer.model.cfg.vision.image_size == 32  # the checkpoint's
    err = capsys.readouterr().err
    assert "warning: [model] image_size, vocab_size: for a model built from scratch; ignored with init" \
        in err


def test_training_bfloat16_weights_is_warned_about(data, tmp_path, capsys):
    """An audit measured 6% of the weights changing at all in 20 steps of pure-bfloat16 fine-tuning, 52% with
    float32 master weights: AdamW's steps fall below half of bfloat16's spacing and round away."""
    Trainer(config(data, tmp_path / "a", **OVER))
    assert "round away" not in capsys.readouterr().err
    trainer = Trainer(config(data, tmp_path / "b", **OVER, model__dtype="bfloat16"))
    n = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert f"warning: {n:,} trainable parameters are stored in bfloat16, where small updates round away" in \
        capsys.readouterr().err
