"""What a checkpoint records so that `--resume` continues the same run, and what a resume may change.

A resumed run draws the same batches as the uninterrupted one only if everything that decides them is unchanged:
the seed, the batch size, the data (its bytes and how it is repeated) and the late mix. A checkpoint stores these
(`identity`) and a resume refuses a run that differs (`check_identity`), naming the setting.

The optimizer's settings may change on a resume (say, a lower learning rate for the rest of a run): the schedule's
learning rate is computed every step, and the AdamW settings (weight_decay, betas, eps) and the lr_scale groups are
the new config's; the moments are restored per parameter name. A resume says which [optim] settings changed
(`optim_changes`), as config.toml records the new ones. The model is the checkpoint's: a run built from scratch
resumes only with the [model] keys that built it (`check_model`), as config.toml must describe the weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from palitorch.errors import ConfigError
from palitorch.train.config import SCRATCH_ONLY

# How `identity` decides each step's examples, written into trainer_state.json for a reader of the checkpoint.
DATA_ORDER = ("epoch e: torch.randperm(num_examples, seed * 1000003 + e) (grouped by image when per_image > 1: "
              "palitorch.train.data.grouped_order), cut into batches, tail dropped; step s takes batch s mod "
              "batches_per_epoch of epoch s div it; from step late_from on the same over the late_examples of [data] "
              "late_task_repeat")

# Settings absent from checkpoints written by older palitorch versions, with the value they had then; those without
# a value here are checked only where the checkpoint has them.
OLDER = {"per_image": 1, "late_from": 0, "late_examples": 0}


def log_window(saved) -> dict:
    """The sums ("steps", "loss", "tokens", "time") over the steps since the last metrics row, as a checkpoint's
    "log_window" holds them (a resumed run's next row then averages the steps the uninterrupted run's does); zeros
    for None, or a checkpoint of an older palitorch without them."""
    keys = ("steps", "loss", "tokens", "time")
    ok = isinstance(saved, dict) and all(type(saved.get(k)) in (int, float) for k in keys)
    return {k: saved[k] for k in keys} if ok else dict.fromkeys(keys, 0)


def identity(trainer) -> dict:
    """The settings that decide which examples each step draws (stored in trainer_state.json)."""
    t, d = trainer.cfg.train, trainer.cfg.data
    late = len(trainer.late_data) if trainer.late_data is not None else 0
    return {"seed": t.seed, "batch_size": t.batch_size, "data_fingerprint": trainer.fingerprint,
            "task_repeat": _repeats(d.task_repeat), "num_examples": len(trainer.data), "per_image": d.per_image,
            "late_from": d.late_from, "late_examples": late,
            "late_task_repeat": _repeats(d.late_task_repeat) if d.late_from > 0 else {}}  # (unused without late_from)


def _repeats(table: dict) -> dict:
    """A task_repeat table without its entries of 1 (the default: {detect = 1} is the data of {})."""
    return {k: v for k, v in sorted(table.items()) if v != 1}


def check_identity(saved: dict, now: dict, checkpoint: str) -> None:
    """ConfigError naming the first setting in which this run differs from the checkpoint's."""
    for k, v in now.items():
        if k not in saved and k not in OLDER:
            continue
        was = saved.get(k, OLDER.get(k))
        if was != json.loads(json.dumps(v)):  # (as trainer_state.json holds it: a table's keys are strings)
            raise ConfigError(f"--resume: {checkpoint} was trained with {k} {was!r}, this run has {v!r}: resume "
                              "with the same settings, or start a new run in another folder")


def optim_changes(saved_config: dict, cfg) -> list[str]:
    """The [optim] settings that differ from the checkpoint's config, as 'name old -> new'."""
    old = saved_config.get("optim", {})
    return [f"{k} {old[k]!r} -> {v!r}" for k, v in asdict(cfg.optim).items()
            if k in old and old[k] != json.loads(json.dumps(v))]


def check_model(saved_config: dict, cfg, checkpoint: str) -> None:
    """ConfigError when this run's [model] describes another model than the checkpoint holds: a from-scratch key
    changed, or [model] init given or taken away (a resume reads the checkpoint's weights either way)."""
    old = saved_config.get("model")
    if not old:
        return
    if bool(old.get("init")) != bool(cfg.model.init):
        was = f"fine-tuned from [model] init {old['init']!r}" if old.get("init") else "built from scratch"
        raise ConfigError(f"--resume: {checkpoint} was {was}, this run has [model] init {cfg.model.init!r}: a resume "
                          "goes on with the checkpoint's weights; set init as it was, or start a new run elsewhere")
    if old.get("init"):
        return  # (its from-scratch keys are ignored, and warned of, anyway)
    for k in SCRATCH_ONLY:
        v = json.loads(json.dumps(getattr(cfg.model, k)))
        if k in old and old[k] != v:
            raise ConfigError(f"--resume: {checkpoint} holds a model built with [model] {k} {old[k]!r}, this run has "
                              f"{v!r}: a resume goes on with the checkpoint's model; set it back, or start a new run "
                              "in another folder")
