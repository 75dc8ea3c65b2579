"""The training config: TOML sections, typed --section.key overrides, one-line errors, a TOML round trip."""

import pytest

from palitorch.errors import ConfigError
from palitorch.train.config import TrainConfig, load_config, parse_overrides

TOML = """
[model]
preset = "tiny"
image_size = 32
[data]
train = ["a.jsonl", "b.jsonl"]
task_repeat = {caption = 4}
[train]
steps = 100
bf16 = true
[optim]
lr = 1e-3
"""


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(TOML)
    cfg = load_config(f, ["--optim.lr", "3e-4", "--train.steps=7", "--train.out", "123", "--train.bf16", "false",
                          "--train.trainable", "projector,decoder", "--data.task_repeat", "{caption = 2}"])
    assert cfg.model.image_size == 32 and cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.train.out == "123" and cfg.train.bf16 is False
    assert cfg.train.trainable == ["projector", "decoder"]
    assert cfg.data.task_repeat == {"caption": 2}
    assert cfg.model.patch_size == TrainConfig().model.patch_size  # untouched fields keep their defaults


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["--data.train", "x.jsonl", "--data.task_repeat", '{"cap tion" = 3}',
                             "--optim.eps", "1e-8", "--train.out", 'we"ird\\path'])
    f = tmp_path / "again.toml"
    f.write_text(cfg.to_toml())
    assert load_config(f) == cfg


@pytest.mark.parametrize("args,message", [
    (["--optim.lr", "fast"], "optim.lr: expected a number"),
    (["--train.steps", "1.5"], "train.steps: expected a whole number"),
    (["--optim.nope", "1"], "[optim] has no field 'nope'"),
    (["--bogus.lr", "1"], "write it as --section.key"),
    (["--train.steps"], "has no value"),
    (["stray"], "unexpected argument"),
    (["--optim.schedule", "step"], "schedule 'step' is not one of"),
    (["--train.bf16", "maybe"], "expected true or false"),
    (["--train.log_every", "0"], "log_every must be >= 1"),
    (["--warmstart.box_edges_weight", "-1"], "box_edges_weight must be >= 0"),
])
def test_bad_overrides_are_one_line_errors(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--data.train", "x.jsonl", *args])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("[optimizer]\nlr = 1")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(bad)
    with pytest.raises(ConfigError, match="train is empty"):
        load_config(None, [])


def test_parse_overrides():
    assert parse_overrides(["--a.b", "1", "--c.d=x=y"]) == [("a.b", "1"), ("c.d", "x=y")]


def test_cli_prints_config_and_reports_errors_in_one_line(tmp_path, capsys):
    from palitorch.cli import main

    f = tmp_path / "c.toml"
    f.write_text(TOML)
    assert main(["train", str(f), "--optim.lr", "0.5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    again = tmp_path / "again.toml"
    again.write_text(printed)
    assert load_config(again).optim.lr == 0.5
    assert main(["train", str(f), "--optim.lr", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "palitorch train: error: optim.lr: expected a number, got 'fast'"
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
