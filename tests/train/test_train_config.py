"""The training config: TOML sections, typed --section.key overrides, one-line errors, a TOML round trip."""

import typing
from pathlib import Path

import pytest

from palitorch.errors import CheckpointError, ConfigError
from palitorch.train.config import LIMITS, SECTIONS, TrainConfig, load_config, parse_overrides
from palitorch.train.runfolder import check_can_create

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


def test_quoted_strings_on_the_command_line_are_toml_strings():
    """`--data.eval '""'` is the empty string (it was the file '""'); a bare word or number is taken as it is."""
    cfg = load_config(None, ["--data.train", "x.jsonl", "--data.eval", '""', "--model.init", '"/my models/pg"',
                             "--train.out", "123"])
    assert (cfg.data.eval, cfg.model.init, cfg.train.out) == ("", "/my models/pg", "123")


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["--data.train", "x.jsonl", "--data.task_repeat", '{"cap tion" = 3}',
                             "--optim.eps", "1e-8", "--train.out", 'we"ird\\path\nwith\tcontrols\x7f'])
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
    (["--resum"], "unrecognized option --resum (did you mean --resume?)"),  # (was "override --resum has no value")
    (["--print-confg"], "did you mean --print-config?"),
    (["--optim.schedule", "step"], "schedule 'step' is not one of"),
    (["--train.bf16", "maybe"], "expected true or false"),
    (["--train.log_every", "0"], "log_every must be >= 1"),
    (["--warmstart.box_edges_weight", "-1"], "box_edges_weight must be >= 0"),
    # values torch refuses later (or that make NaN weights), refused before any work starts
    (["--optim.beta1", "2"], "[optim] beta1 must be >= 0 and < 1, got 2.0"),
    (["--optim.eps", "-1"], "[optim] eps must be > 0"),
    (["--optim.lr", "nan"], "[optim] lr must be a finite number, got nan"),
    (["--optim.lr", "inf"], "[optim] lr must be a finite number, got inf"),
    (["--warmstart.lr", "-1"], "[warmstart] lr must be > 0"),
    (["--model.patch_size", "0"], "[model] patch_size must be >= 1, got 0"),
    (["--model.image_size", "-16"], "[model] image_size must be >= 1"),
    (["--model.image_size", "20"], "image_size 20 is not a multiple of patch_size 8"),
    (["--model.max_length", "64"], "max_length 64 leaves no room for text after the 64 image tokens"),
    (["--model.preset", "huge"], "preset 'huge' is not one of tiny, small, base"),
    (["--eval.batch_size", "0"], "[eval] batch_size must be >= 1, got 0"),
    (["--train.out", ""], "[train] out is empty"),
    # values that were accepted and meant something else (or nothing)
    (["--optim.weight_decay", "-1"], "[optim] weight_decay must be >= 0"),
    (["--optim.clip_grad_norm", "-1"], "clip_grad_norm must be >= 0 (0 = no clipping), got -1.0"),
    (["--eval.max_examples", "-3"], "[eval] max_examples must be >= 0, got -3"),
    (["--warmstart.epochs", "-1"], "[warmstart] epochs must be >= 0"),
    (["--augment.brightness", "-1"], "[augment] brightness must be between 0 and 1"),
    (["--model.init_std", "-1"], "[model] init_std must be > 0"),
    (["--train.seed", "-1"], "[train] seed must be between 0 and 2**32 - 1"),
    (["--optim.lr_scale", "{vision = inf}"], "lr_scale.vision must be a finite number >= 0"),
    (["--model.dtype", "float64"], "[model] dtype 'float64' is not one of float32, bfloat16"),
    (["--model.dtype", "float16"], "float16 weights need the loss scaling that training does not do"),
    (["--eval.group_by", '["task", "boxes"]'], "[eval] group_by 'boxes' is the name of an overall metric"),
    (["--eval.group_by", '["vqa_accuracy"]'], "[eval] group_by 'vqa_accuracy' is the name of an overall metric"),
    (["--eval.metrics", '["vqa", "ciders"]'], "[eval] metrics: unknown metric 'ciders' (did you mean 'cider'?)"),
    (["--eval.metrics", "[]"], "[eval] metrics: name at least one of exact, vqa, anls, relaxed, cider"),
    (["--eval.metrics", '["vqa", "anls", "anls"]'], "[eval] metrics: 'anls' is named twice"),  # (not the first)
    # each check at its boundary (a value just past the limit, or one a loose check would take for another type)
    (["--train.epochs", "0"], "[train] give steps > 0 or epochs > 0"),
    (["--train.device", "mps"], "[train] device 'mps' is not one of auto, cpu, cuda"),
    (["--data.late_from", "1"], "[data] a late_from > 0 needs a late_task_repeat table"),
    (["--data.task_repeat", "{caption = true}"], "[data] task_repeat.caption must be a whole number >= 0, got True"),
    (["--data.late_task_repeat", "{vqa = -1}"], "late_task_repeat.vqa must be a whole number >= 0, got -1"),
    (["--data.per_image", "0"], "[data] per_image must be >= 1, got 0"),
    (["--checkpoint.keep", "0"], "[checkpoint] keep must be >= 1, got 0"),
    (["--model.version", "3"], "[model] version must be 1 or 2, got 3"),
    (["--train.seed", str(2**32)], "[train] seed must be between 0 and 2**32 - 1"),
    (["--optim.lr_scale", "{vision = -0.1}"], "lr_scale.vision must be a finite number >= 0, got -0.1"),
    (["--train.steps", "true"], "train.steps: expected a whole number, got True"),
    (["--optim.lr", "true"], "optim.lr: expected a number, got True"),
    (["--hepl"], "did you mean --help?"),
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


def test_every_number_has_a_range():
    numbers = {f"{sec}.{name}" for sec, cls in SECTIONS.items()
               for name, tp in typing.get_type_hints(cls).items() if tp in (int, float)}
    assert numbers == {f"{sec}.{name}" for sec, fields in LIMITS.items() for name in fields}
    load_config(None, ["--data.train", "x.jsonl"])  # the defaults are in range
    for f in Path(__file__).parents[2].glob("configs/*.toml"):
        load_config(f)


def test_file_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="is a folder: give a .toml file"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="bad.toml is not UTF-8 text"):
        load_config(bad)
    bad.write_text("steps = 3\n[train]\nbatch_size = 8")
    with pytest.raises(ConfigError, match=r"top-level key 'steps' must be inside a section: put it under \[train\]$"):
        load_config(bad)
    bad.write_text("every = 3")
    with pytest.raises(ConfigError, match=r"under \[eval\] or \[checkpoint\]$"):
        load_config(bad)
    bad.write_text("nope = 3")
    with pytest.raises(ConfigError, match=r"inside a section such as \[train\]; sections are: model, "):
        load_config(bad)


def test_out_must_be_able_to_become_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    for out, message in (("file", "file' is a file: name a folder"), ("file/run", "lies under the file")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["--data.train", "x.jsonl", "--train.out", str(tmp_path / out)])


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


def test_cli_needs_only_the_config(capsys):
    from palitorch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("palitorch train: error: the following arguments are required: config "
                                       "(see palitorch train --help)\n")


def test_cli_refuses_a_folder_that_is_no_checkpoint_before_any_work(tmp_path, capsys):
    from palitorch.cli import main

    f = tmp_path / "c.toml"
    f.write_text(TOML)
    run, empty, out = tmp_path / "run", tmp_path / "empty", tmp_path / "out"
    run.mkdir()
    (run / "config.toml").write_text("")
    empty.mkdir()
    for init, message in ((run, f"run is a training run folder: use {run / 'model'}"),
                          (empty, "empty is not a checkpoint folder (no config.json)")):
        assert main(["train", str(f), "--model.init", str(init), "--train.out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_data_out_must_be_able_to_become_a_folder(tmp_path, capsys):
    from palitorch.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["data", "easyvqa", "--out", str(tmp_path / "file")]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is a file: name a folder" in err


def test_cli_names_an_out_folder_that_cannot_be_made_before_any_work(tmp_path, capsys):
    """mkdir under /proc fails even for root; --print-config writes nothing, so it does not check."""
    from palitorch.cli import main

    if not Path("/proc/1").is_dir():
        pytest.skip("needs Linux's /proc")
    f = tmp_path / "c.toml"
    f.write_text(TOML)
    assert main(["train", str(f), "--train.out", "/proc/1/run", "--print-config"]) == 0
    capsys.readouterr()
    assert main(["train", str(f), "--train.out", "/proc/1/run"]) == 2
    assert capsys.readouterr().err == ("palitorch train: error: [train] out '/proc/1/run': cannot write a folder in "
                                       "'/proc/1' (No such file or directory): choose another path\n")
    check_can_create(str(tmp_path / "new" / "run"))
    assert list(tmp_path.iterdir()) == [f]  # the check leaves nothing behind


def test_values_the_command_line_spells_loosely(tmp_path, monkeypatch):
    """A whole float is a whole number (`1e3` steps), yes/on in any case are true, empty list items are dropped,
    a folder named `1.50` keeps its spelling, the highest seed is taken, and dtype is case-insensitive."""
    cfg = load_config(None, ["--data.train", "x.jsonl,,", "--train.steps", "1e3", "--train.bf16", "Yes",
                             "--train.gradient_checkpointing", "ON", "--train.trainable", "vision, decoder,",
                             "--train.out", "1.50", "--train.seed", str(2**32 - 1), "--model.dtype", "BF16"])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.train.bf16 is True and cfg.train.gradient_checkpointing is True
    assert cfg.data.train == ["x.jsonl"] and cfg.train.trainable == ["vision", "decoder"]
    assert cfg.train.out == "1.50" and cfg.train.seed == 2**32 - 1
    f = tmp_path / "c.toml"
    f.write_text('[data]\ntrain = ["x.jsonl"]\n[train]\nsteps = 100.0\n')
    assert load_config(f).train.steps == 100


def test_a_switch_on_the_command_line_takes_1_and_0_but_no_other_number():
    """`--train.bf16 1` reached the bool check as the whole number 1 (the command line's text is read as TOML
    first) and was refused, though 1 / 0 are listed beside yes / no; 2 is no switch value."""
    def bf16(word):
        return load_config(None, ["--data.train", "x.jsonl", "--train.bf16", word]).train.bf16

    assert (bf16("1"), bf16("0"), bf16(" 1"), bf16('"1"')) == (True, False, True, True)
    with pytest.raises(ConfigError, match="train.bf16: expected true or false, got 2"):
        bf16("2")


def test_a_toml_file_s_types_are_checked_as_written(tmp_path):
    """In a file a string is a string: `steps = "100"` is refused, not read as the number (only the command line
    reads its text as TOML); a section name given a value is refused by name."""
    f = tmp_path / "c.toml"
    f.write_text('[data]\ntrain = ["x.jsonl"]\n[train]\nsteps = "100"\n')
    with pytest.raises(ConfigError, match="train.steps: expected a whole number, got '100'"):
        load_config(f)
    f.write_text("train = 3\n")
    with pytest.raises(ConfigError, match=r"^train must be a \[section\] table$"):
        load_config(f)


def test_paths_expand_a_tilde_and_from_scratch_keys_are_not_ignored(tmp_path, monkeypatch):
    """Training and held-out files expand `~` like the run folder; without init no [model] key is reported as
    ignored, whatever its value (the warning is for keys a checkpoint overrides)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["--data.train", "~/a.jsonl,~/b.jsonl", "--data.eval", "~/t.jsonl",
                             "--model.image_size", "32", "--model.vocab_size", "300", "--train.out", str(tmp_path)])
    assert cfg.data.train == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert cfg.data.eval == str(tmp_path / "t.jsonl")
    assert cfg.ignored() == []


def test_an_init_hub_id_takes_a_revision_and_the_resolved_config_names_its_snapshot(tmp_path, monkeypatch):
    """[model] revision picks the cached commit of an init given as a Hub id (as --revision does for --model); the
    resolved config records the snapshot folder (its name is the commit) and no revision, so it loads again as is.
    huggingface_hub, offline, names the folder each revision resolves to."""
    from huggingface_hub import snapshot_download

    cache, new, old = tmp_path / "hub", "b" * 40, "c" * 40
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    repo = cache / "models--me--pg"
    for commit in (new, old):
        (repo / "snapshots" / commit).mkdir(parents=True)
        for name in ("config.json", "tokenizer.json", "model.safetensors"):  # (what a checkpoint's snapshot holds)
            (repo / "snapshots" / commit / name).write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    (repo / "refs" / "v1").write_text(old)
    base = ["--model.init", "me/pg", "--data.train", "t.jsonl", "--train.out", str(tmp_path / "run")]
    for revision, commit in ((None, new), ("v1", old), (old, old)):
        cfg = load_config(None, base + (["--model.revision", revision] if revision else []))
        hub = snapshot_download("me/pg", revision=revision, cache_dir=cache, local_files_only=True)
        assert cfg.model.init == hub == str(repo / "snapshots" / commit) and cfg.model.revision == ""
        (tmp_path / "resolved.toml").write_text(cfg.to_toml())
        assert load_config(tmp_path / "resolved.toml").model.init == cfg.model.init
    with pytest.raises(ConfigError, match=r"\[model\] revision 'v1' applies to an init given as a Hub id"):
        load_config(None, ["--model.revision", "v1", "--data.train", "t.jsonl"])
    with pytest.raises(CheckpointError, match="not its revision 'v2'.*hf download me/pg --revision v2"):
        load_config(None, base + ["--model.revision", "v2"])
