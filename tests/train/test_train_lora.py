"""LoRA fine-tuning ([lora] rank > 0): only the adapters train, the saved folders hold the merged weights (a plain
PaliGemma that answers as the trained model does), and --resume reproduces the uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import palitorch
from palitorch.checkpoint import load_model
from palitorch.errors import ConfigError
from palitorch.train import lora
from palitorch.train.loop import Trainer

from trainkit import config, losses


def lora_config(data, base, out, **over):
    settings = {"model__init": str(base), "lora__rank": 4, "lora__alpha": 8.0, "optim__lr": 3e-2,
                "optim__warmup_steps": 0, "optim__schedule": "constant"}
    return config(data, out, **{**settings, **over})


def test_lora_trains_the_adapters_only_and_saves_the_merged_model(data, base, tmp_path):
    trainer = Trainer(lora_config(data, base, tmp_path / "run", train__steps=8))
    assert trainer.trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainer.trainable)
    wrapped = [n for n, _ in lora.wrapped(trainer.model)]
    assert len(wrapped) == 7 * trainer.model.cfg.text.num_layers  # q, k, v, o, gate, up, down in every layer
    before = {k: v.clone() for k, v in load_model(base).state_dict().items()}
    trainer.fit()
    run = losses(tmp_path / "run")
    assert run[8] < run[1]  # it learns
    for name, layer in lora.wrapped(trainer.model):  # the checkpoint's weights stay as they were
        assert torch.equal(layer.base.weight, before[f"{name}.weight"]), name
    saved = load_model(tmp_path / "run" / "model")  # a plain PaliGemma: W + s B A
    name, layer = lora.wrapped(trainer.model)[0]
    want = before[f"{name}.weight"] + layer.scale * (layer.lora_b @ layer.lora_a).detach()
    assert torch.allclose(saved.state_dict()[f"{name}.weight"], want, atol=1e-6)
    patch = "vision_tower.patch_embedding.weight"
    assert saved.state_dict()[patch].equal(before[patch])
    adapter = load_file(tmp_path / "run" / "model" / lora.ADAPTER_FILE)
    assert set(adapter) == {f"{n}.{k}" for n in wrapped for k in ("lora_a", "lora_b")}
    # The merged model answers as the trained one does.
    batch = {k: v for k, v in trainer.data.batch(list(range(4))).items()}
    trainer.model.eval()
    with torch.no_grad():
        ours, theirs = trainer.model(**batch).logits, saved(**batch).logits
    assert (ours - theirs).abs().max() < 1e-4
    pipe = palitorch.load(tmp_path / "run" / "model")
    assert pipe.generate(data / trainer.raw_train[0].image, "caption en", max_new_tokens=3).finish_reason


def assert_resume_follows(data, base, tmp_path, **over):
    """4 steps in one run, and 2 then a resume to 4: the same loss at every step, within 1e-6 (float32)."""
    Trainer(lora_config(data, base, tmp_path / "whole", train__steps=4, **over)).fit()
    Trainer(lora_config(data, base, tmp_path / "split", train__steps=2, **over)).fit()
    Trainer(lora_config(data, base, tmp_path / "split", train__steps=4, **over), resume=True).fit()
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, step


def test_a_resumed_lora_run_follows_the_uninterrupted_one(data, base, tmp_path):
    assert_resume_follows(data, base, tmp_path)


def test_a_resume_keeps_what_trained_in_full_and_checks_the_adapters_settings(data, base, tmp_path):
    over = {"lora__also_train": ["projector"]}
    Trainer(lora_config(data, base, tmp_path / "whole", train__steps=4, **over)).fit()
    Trainer(lora_config(data, base, tmp_path / "split", train__steps=2, **over)).fit()
    Trainer(lora_config(data, base, tmp_path / "split", train__steps=4, **over), resume=True).fit()
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert all(abs(a[step] - b[step]) <= 1e-6 for step in a)  # the trained projector came back too
    with pytest.raises(ConfigError, match="is not \\[model\\] init's weight plus its adapter at \\[lora\\] alpha"):
        Trainer(lora_config(data, base, tmp_path / "split", train__steps=6, lora__alpha=100.0, **over), resume=True)
    (tmp_path / "split" / "checkpoint-0000004" / lora.ADAPTER_FILE).write_bytes(b"damaged")
    resumed = Trainer(lora_config(data, base, tmp_path / "split", train__steps=6, **over), resume=True)
    assert resumed.step == 2  # the newest checkpoint's adapters are damaged: the one before is taken


def test_lora_over_bfloat16_weights_keeps_float32_adapters(data, base, tmp_path):
    trainer = Trainer(lora_config(data, base, tmp_path / "run", train__steps=3, model__dtype="bfloat16"))
    _, layer = lora.wrapped(trainer.model)[0]
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_a.dtype == layer.lora_b.dtype == torch.float32
    trainer.fit()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path / "run").values())
    assert layer.lora_b.abs().sum() > 0  # the adapters moved
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # merged into the weights' own dtype


def test_lora_settings_are_checked(data, base, tmp_path):
    with pytest.raises(ConfigError, match=r"\[lora\] rank > 0 fine-tunes a checkpoint: give \[model\] init"):
        config(data, tmp_path / "a", lora__rank=4)
    with pytest.raises(ConfigError, match="name other parts to train in \\[lora\\] also_train"):
        lora_config(data, base, tmp_path / "b", train__trainable=["decoder"])
    with pytest.raises(ConfigError, match=r"\[lora\] dropout must be between 0 and 1"):
        lora_config(data, base, tmp_path / "c", lora__dropout=1.0)
    with pytest.raises(ConfigError, match=r"\[lora\] target 'vison_tower\.\*' matches no linear layer"):
        Trainer(lora_config(data, base, tmp_path / "d", lora__targets=["language_model.layers.*", "vison_tower.*"]))
    with pytest.raises(ConfigError, match=r"\[lora\] also_train selects language_model\.layers\.0\..*own weights"):
        Trainer(lora_config(data, base, tmp_path / "f", lora__also_train=["decoder"]))
    with pytest.raises(ConfigError, match=r"\[lora\] also_train pattern 'projektor' matches no parameter"):
        Trainer(lora_config(data, base, tmp_path / "g", lora__also_train=["projektor"]))
    with pytest.raises(ConfigError, match=r"\[warmstart\] trains the vision tower in full: not with \[lora\]"):
        lora_config(data, base, tmp_path / "h", warmstart__epochs=1)
    model = load_model(base)  # an untied LM head is never wrapped: the decoder reads its weight directly
    model.language_model.lm_head = torch.nn.Linear(4, 4)
    assert "language_model.lm_head" not in lora.apply(model, ["*"], 2, 4.0, 0.0, seed=0)
    trainer = Trainer(lora_config(data, base, tmp_path / "e", lora__also_train=["projector"]))
    assert {n for n in trainer.trainable if not n.endswith((".lora_a", ".lora_b"))} == \
        {"projector.weight", "projector.bias"}


def test_two_processes_train_the_adapters_as_one_does(data, base, tmp_path):
    """Under torchrun every process draws the same A and sums the adapters' gradients: the one-process loss curve of
    the same global batch."""
    over = {"train__steps": 4, "eval__final_max_examples": 4}
    Trainer(lora_config(data, base, tmp_path / "one", train__micro_batch_size=4, **over)).fit()
    (tmp_path / "two.toml").write_text(lora_config(data, base, tmp_path / "two", **over).to_toml())
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "palitorch", "train", str(tmp_path / "two.toml")]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) <= 1e-4 for s in a), (a, b)  # tolerance: float summation order only
    assert json.loads((tmp_path / "two" / "model" / lora.ADAPTER_CONFIG).read_text())["r"] == 4


@pytest.mark.parametrize("full", ["projector", "embeddings"])
def test_the_peft_adapter_on_the_init_checkpoint_is_the_trained_model(data, base, tmp_path, full):
    """RUN/model/peft is a PEFT LoRA adapter of [model] init: PEFT over transformers' init gives the merged model's
    logits, with adapters on the vision tower too and a part trained in full (PEFT's modules_to_save): the
    projector, or the token embedding, which is also the output layer (PEFT's ensure_weight_tying keeps them one)."""
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration as HF

    over = {"lora__targets": ["language_model.layers.*", "vision_tower.layers.1.*"], "lora__also_train": [full]}
    trainer = Trainer(lora_config(data, base, tmp_path / "run", train__steps=3, **over))
    trainer.fit()
    folder = tmp_path / "run" / "model"
    settings = json.loads((folder / lora.PEFT_FOLDER / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], settings["peft_type"]) == (4, 8.0, "LORA")
    saved = {"projector": "model.multi_modal_projector.linear", "embeddings": "model.language_model.embed_tokens"}
    assert settings["modules_to_save"] == [saved[full]]
    assert settings.get("ensure_weight_tying", False) == (full == "embeddings")
    assert "model.vision_tower.encoder.layers.1.self_attn.q_proj" in settings["target_modules"]
    b = trainer.data.batch([0, 1, 2, 3])
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    inputs["pixel_values"] = b["pixel_values"][b["image_index"]]
    real = b["attention_mask"].bool()
    with torch.no_grad():
        merged = HF.from_pretrained(folder).eval()(**inputs).logits[real]
        adapted = PeftModel.from_pretrained(HF.from_pretrained(base), folder / lora.PEFT_FOLDER).eval()
        peft_logits = adapted(**inputs).logits[real]
        plain = HF.from_pretrained(base).eval()(**inputs).logits[real]
    assert (merged - plain).abs().max() > 1e-2  # the adapters moved the model
    assert (peft_logits - merged).abs().max() < 1e-4  # float32; merged vs unmerged: summation order only
    image = data / trainer.raw_train[0].image  # and palitorch merges it at load as transformers + PEFT run it
    ours = palitorch.load(base, adapter=folder / lora.PEFT_FOLDER).score(image, "caption en", "red circle")
    want = palitorch.load(folder).score(image, "caption en", "red circle")
    assert max(abs(x - y) for x, y in zip(ours.logprobs, want.logprobs)) < 1e-4


def test_a_resumed_run_with_adapter_dropout_draws_the_uninterrupted_masks(data, base, tmp_path):
    """[lora] dropout draws its masks from torch's generator: a resume restores the generator's state from the
    checkpoint (rng_state.safetensors), so steps 3 and 4 draw the masks of the uninterrupted run. Losses within
    1e-6 (float32, the same masks and weights)."""
    assert_resume_follows(data, base, tmp_path, lora__dropout=0.25)


def test_a_lora_checkpoint_with_a_damaged_adapter_file_is_damaged(data, base, tmp_path):
    """A LoRA run's checkpoint holds its adapters (adapter.safetensors): `read` checks that file too, so a resume
    falls back past a checkpoint whose adapters were cut short."""
    from palitorch.errors import CheckpointError
    from palitorch.train import lora, state

    run = tmp_path / "run"
    Trainer(lora_config(data, base, run, train__steps=2, checkpoint__every=2)).fit()
    folder = state.checkpoints(run)[-1][1]
    with open(folder / lora.ADAPTER_FILE, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors"):
        state.read(folder)
