"""Fine-tuning a checkpoint folder ([model] init): max_length as a cap under the checkpoint's context, its
generation_config.json carried into every folder the run writes, nothing of an earlier run's tokenizer carried."""

import json

import pytest

import palitorch
from palitorch.errors import ConfigError
from palitorch.train.loop import Trainer

from trainkit import config

GENERATION = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "max_new_tokens": 7, "do_sample": False}


def test_max_length_caps_fine_tuning_examples_against_the_checkpoints_geometry(data, base, tmp_path):
    # 16 image tokens + <bos> + "caption en" + "\n" + the caption + <eos>: over 20. (The from-scratch check against
    # 64 image tokens used to refuse 20 before the checkpoint was read.)
    with pytest.raises(ConfigError, match=r"train\.jsonl:1: the example is \d+ tokens with the image, over \[model\] "
                                          r"max_length 20: shorten it, or raise max_length \(at most the model's "
                                          r"context of 8192\)"):
        Trainer(config(data, tmp_path / "a", model__init=str(base), model__max_length=20))
    with pytest.raises(ConfigError, match="max_length 16 leaves no room for text after the 16 image tokens of the "
                                          "checkpoint .*: give a value from 17 to 8192, or 0"):
        Trainer(config(data, tmp_path / "b", model__init=str(base), model__max_length=16))
    with pytest.raises(ConfigError, match="max_length 9000 is over the 8192-token context of the checkpoint "):
        Trainer(config(data, tmp_path / "c", model__init=str(base), model__max_length=9000))
    # A cap the examples fit trains, and the saved model keeps the checkpoint's context.
    trainer = Trainer(config(data, tmp_path / "d", model__init=str(base), model__max_length=40, train__steps=1))
    assert max(trainer.data.lengths) <= 40
    trainer.fit()
    assert palitorch.load(tmp_path / "d" / "model").cfg.text.max_position_embeddings == 8192


def test_from_scratch_max_length_is_the_context(data, tmp_path):
    assert config(data, tmp_path / "a").model.max_length == 0
    trainer = Trainer(config(data, tmp_path / "a", train__steps=1))  # 0: the 512 tokens it always had
    assert trainer.model.cfg.text.max_position_embeddings == 512
    with pytest.raises(ConfigError, match="max_length 4 leaves no room for text after the 4 image tokens"):
        config(data, tmp_path / "b", model__max_length=4)


def test_the_checkpoints_generation_config_travels_with_every_saved_folder(data, base, tmp_path):
    init = tmp_path / "init"
    init.mkdir()
    for f in base.iterdir():
        (init / f.name).write_bytes(f.read_bytes())
    (init / "generation_config.json").write_text(json.dumps(GENERATION))
    over = {"model__init": str(init), "train__steps": 2, "checkpoint__every": 1, "checkpoint__keep": 5}
    Trainer(config(data, tmp_path / "run", **over)).fit()
    want = (init / "generation_config.json").read_bytes()
    for name in ("checkpoint-0000001", "checkpoint-0000002", "model"):
        assert (tmp_path / "run" / name / "generation_config.json").read_bytes() == want, name
    # A resume takes it from the checkpoint: the init folder may be gone by then.
    (init / "generation_config.json").unlink()
    Trainer(config(data, tmp_path / "run", **{**over, "train__steps": 3}), resume=True).fit()
    for name in ("checkpoint-0000003", "model"):
        assert (tmp_path / "run" / name / "generation_config.json").read_bytes() == want, name


def test_the_checkpoints_image_preprocessing_is_trained_on_and_travels(data, base, tmp_path):
    """A checkpoint's own preprocessor_config.json (here bilinear, other mean/std) is what training resizes with
    and what every saved folder holds: the defaults replaced it, so the fine-tuned model was fed other pixels at
    inference, and a resumed run (rebuilt from its checkpoint) parted from the uninterrupted one."""
    init = tmp_path / "init"
    init.mkdir()
    for f in base.iterdir():
        (init / f.name).write_bytes(f.read_bytes())
    pre = json.loads((init / "preprocessor_config.json").read_text())
    (init / "preprocessor_config.json").write_text(json.dumps(pre | {"resample": 2, "image_mean": [0.4, 0.5, 0.6]}))
    over = {"model__init": str(init), "train__steps": 2, "checkpoint__every": 1}
    trainer = Trainer(config(data, tmp_path / "run", **over))
    image = trainer.raw_train[0].image
    assert trainer.images.decode(image).equal(trainer.processor.resized(image))  # resized as inference resizes
    assert trainer.processor.resample == 2
    trainer.fit()
    want = (init / "preprocessor_config.json").read_bytes()
    for name in ("checkpoint-0000002", "model"):
        assert (tmp_path / "run" / name / "preprocessor_config.json").read_bytes() == want, name


def test_a_new_run_carries_nothing_an_earlier_run_left_in_its_tokenizer_folder(data, tmp_path):
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    (run / "config.toml").write_text("")  # an earlier run's folder, e.g. of a fine-tuned Hub checkpoint
    (run / "tokenizer" / "generation_config.json").write_text(json.dumps(GENERATION))
    (run / "tokenizer" / "tokenizer.model").write_bytes(b"an earlier run's SentencePiece model")
    Trainer(config(data, run, train__steps=1)).fit()  # from scratch: a learned tokenizer
    saved = {p.name for p in (run / "model").iterdir()}
    assert "tokenizer.json" in saved and not saved & {"generation_config.json", "tokenizer.model"}
