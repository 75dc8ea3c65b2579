"""What a resume compares with its checkpoint (continuation.py): the settings that decide the batches, the model's
from-scratch keys, and the [optim] settings it reports as changed; checkpoints of older versions lack some."""

from types import SimpleNamespace

import pytest

from palitorch.errors import ConfigError
from palitorch.train import continuation
from palitorch.train.config import ModelConfig
from palitorch.train.loop import Trainer

from trainkit import config

CKPT = "checkpoint-0000002"


def identity(task_repeat=None, late_task_repeat=None, late_from=0, late_data=None):
    """continuation.identity of a run over 24 examples, 48 after its task_repeat."""
    data = SimpleNamespace(task_repeat=task_repeat or {}, late_task_repeat=late_task_repeat or {}, per_image=1,
                           late_from=late_from)
    cfg = SimpleNamespace(train=SimpleNamespace(seed=0, batch_size=8), data=data)
    trainer = SimpleNamespace(cfg=cfg, late_data=late_data, fingerprint="f", data=[0] * 48, raw_train=[0] * 24)
    return continuation.identity(trainer)


def test_what_decides_the_batches_is_compared_as_the_data_draws_them():
    """A task_repeat entry of 1 is the default ({caption = 1} draws what {} draws), and late_task_repeat is unused
    without late_from: neither stops a resume. A repeat that changes the data does."""
    import json

    saved = json.loads(json.dumps(identity({"vqa": 2})))  # (as trainer_state.json holds it)
    continuation.check_identity(saved, identity({"vqa": 2, "caption": 1}), CKPT)
    continuation.check_identity(saved, identity({"vqa": 2}, late_task_repeat={"vqa": 0}), CKPT)
    with pytest.raises(ConfigError, match=r"trained with task_repeat \{'vqa': 2\}, this run has \{'caption': 2,"):
        continuation.check_identity(saved, identity({"vqa": 2, "caption": 2}), CKPT)
    # What trainer_state.json records for a reader (DATA_ORDER): the examples drawn from, after the repeats.
    late = identity({"vqa": 2}, {"vqa": 0}, late_from=3, late_data=[0] * 24)
    assert saved["num_examples"] == 48 and late["late_examples"] == 24 and late["late_task_repeat"] == {"vqa": 0}


def model_cfg(init="", **keys):
    """A config whose [model] has the defaults (as a from-scratch run writes them), then `init` and `keys`."""
    return SimpleNamespace(model=ModelConfig(init=init, **keys))


def test_check_model_reads_checkpoints_of_older_versions_and_says_how_a_model_was_made():
    """A checkpoint without a [model] table, or without a key added since (smooth_locs, say), has nothing to compare
    it with: no refusal. Taking [model] init away from a fine-tuned run's resume names the init it was tuned from."""
    hub = "google/paligemma-3b-pt-224"
    continuation.check_model({}, model_cfg(hub), CKPT)
    continuation.check_model({"model": {"image_size": 224}}, model_cfg(image_size=224), CKPT)
    with pytest.raises(ConfigError, match=rf"was fine-tuned from \[model\] init '{hub}', this run has \[model\] "
                                          r"init '': a resume"):
        continuation.check_model({"model": {"init": hub}}, model_cfg(""), CKPT)


def test_a_resume_names_the_optim_settings_it_changes(data, tmp_path, capsys):
    """[optim] may change on a resume (the schedule and AdamW take the new values): the run says which, as
    'name old -> new', and says nothing when none did."""
    over = {"train__steps": 2, "checkpoint__every": 2, "eval__final_max_examples": 2}
    Trainer(config(data, tmp_path / "run", **over)).fit()
    capsys.readouterr()
    Trainer(config(data, tmp_path / "run", **{**over, "train__steps": 3}), resume=True)
    assert "[optim]" not in capsys.readouterr().err
    Trainer(config(data, tmp_path / "run", **{**over, "train__steps": 3, "optim__lr": 5e-4, "optim__beta2": 0.99}),
            resume=True)
    assert "--resume: [optim] lr 0.001 -> 0.0005; beta2 0.999 -> 0.99 (from step 2 on)" in capsys.readouterr().err
    # A checkpoint of an older palitorch may lack a setting: it is not reported as changed.
    cfg = config(data, tmp_path / "x", optim__eps=1e-6)
    assert continuation.optim_changes({"optim": {"lr": 1e-3}}, cfg) == []
