"""The trainer: from scratch and fine-tuning, checkpoints both loaders read, exact resume, frozen parts, eval."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

import palitorch
from palitorch.checkpoint import load_model
from palitorch.errors import ConfigError
from palitorch.train.loop import Trainer
from palitorch.train.state import checkpoints

from hf_factory import hf_processor, write_checkpoint
from trainkit import config, losses, make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def assert_loads_in_transformers(folder, pipe):
    """transformers reads the folder (weights, config, tokenizer, preprocessor) and gives our logits (1e-4)."""
    from transformers import PaliGemmaForConditionalGeneration

    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder).eval()
    proc = hf_processor(folder)
    image = Image.new("RGB", (20, 20), (20, 20, 230))
    inputs = proc(text="caption en", images=image, suffix="blue circle", return_tensors="pt")
    ours = pipe.processor([image], ["caption en"], ["blue circle"])
    assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()
    with torch.no_grad():
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                 token_type_ids=inputs["token_type_ids"], attention_mask=inputs["attention_mask"]).logits
        got = pipe.model(ours["input_ids"], ours["pixel_values"], ours["attention_mask"],
                         ours["token_type_ids"]).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_from_scratch_learns_and_saves_a_hub_folder(data, tmp_path):
    cfg = config(data, tmp_path / "run", train__steps=24, optim__lr=3e-3, checkpoint__every=10,
                 checkpoint__keep=2)
    result = Trainer(cfg).fit()
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 25))
    # The loss falls well below its start (a random 1.1M model starts near ln(vocab) ~ 7).
    assert sum(curve[s] for s in range(20, 25)) / 5 < 0.5 * curve[1]
    assert [s for s, _ in checkpoints(tmp_path / "run")] == [20, 24]  # newest 2 kept (10 deleted)
    assert result["n"] == 16 and set(result["task"]) == {"caption", "vqa"} and "color" in result["qtype"]
    final = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["eval"] == result
    pipe = palitorch.load(tmp_path / "run" / "model")
    assert pipe.cfg.vision.image_size == 16 and pipe.cfg.num_image_tokens == 4
    assert_loads_in_transformers(tmp_path / "run" / "model", pipe)
    # The checkpoint folders are Hub folders too; their extra training-state files do not disturb loading.
    ckpt = load_model(tmp_path / "run" / "checkpoint-0000024")
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v, ckpt.state_dict()[k]), k


def test_fine_tune_a_hub_checkpoint(data, tmp_path):
    base, _ = write_checkpoint(tmp_path / "base", image_size=32, patch_size=8)
    cfg = config(data, tmp_path / "ft", model__init=str(base), train__steps=30, optim__lr=1e-3,
                 optim__warmup_steps=3)
    Trainer(cfg).fit()
    curve = losses(tmp_path / "ft")
    assert sum(curve[s] for s in range(26, 31)) / 5 < 0.5 * curve[1]  # tolerance: at least halved
    out = tmp_path / "ft" / "model"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()  # its own tokenizer
    pipe = palitorch.load(out)
    before = load_model(base)
    assert not torch.equal(pipe.model.projector.weight, before.projector.weight)
    assert_loads_in_transformers(out, pipe)


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    over = {"train__steps": 9, "train__micro_batch_size": 3, "checkpoint__every": 3, "checkpoint__keep": 1,
            "data__task_repeat": "{caption = 2}", "augment__brightness": 0.2, "augment__noise": 0.02,
            "warmstart__epochs": 1, "warmstart__batch_size": 8, "eval__max_examples": 4,
            "data__late_from": 7, "data__late_task_repeat": "{vqa = 0}"}  # the resumed steps cross into the late mix
    Trainer(config(data, tmp_path / "a", **over)).fit()

    class Crash(Trainer):
        def train_step(self, step):
            if step == 7:  # after the checkpoint at 6, with step 7 already logged
                raise KeyboardInterrupt
            return super().train_step(step)

    with pytest.raises(KeyboardInterrupt):
        Crash(config(data, tmp_path / "b", **over)).fit()
    assert [s for s, _ in checkpoints(tmp_path / "b")] == [6]  # keep 1: the resumed-from one is deleted later
    with pytest.raises(ConfigError, match="pass --resume"):
        Trainer(config(data, tmp_path / "b", **over))
    Trainer(config(data, tmp_path / "b", **over), resume=True).fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 10))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    wa, wb = load_model(tmp_path / "a" / "model").state_dict(), load_model(tmp_path / "b" / "model").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0), k


def test_resume_refuses_changed_data(data, tmp_path):
    Trainer(config(data, tmp_path / "r", train__steps=2, checkpoint__every=1)).fit()
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(config(data, tmp_path / "r", train__batch_size=4), resume=True)
    with pytest.raises(ConfigError, match="late_from"):
        Trainer(config(data, tmp_path / "r", data__late_from=1, data__late_task_repeat="{vqa = 0}"), resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        Trainer(config(data, tmp_path / "empty"), resume=True)


def test_frozen_parts_do_not_move(data, tmp_path):
    cfg = config(data, tmp_path / "f", train__steps=3, train__trainable=["projector", "*.post_layernorm.*"])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert {n.split(".")[0] for n in trainer.names} == {"projector", "vision_tower"}
    assert sum(len(g["params"]) for g in trainer.opt.param_groups) == 4  # 2 projector + 2 post-layernorm tensors
    trainer.fit()
    for k, v in trainer.model.state_dict().items():
        moved = not torch.equal(v, before[k])
        assert moved == (k.startswith("projector.") or ".post_layernorm." in k), k
    with pytest.raises(ConfigError, match="matches no parameter"):
        Trainer(config(data, tmp_path / "g", train__trainable=["vison"]))


def test_weight_decay_skips_biases_and_norms(data, tmp_path):
    trainer = Trainer(config(data, tmp_path / "wd"))
    decay, plain = trainer.opt.param_groups
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in plain["params"])


def test_lr_scale_multiplies_the_schedule_per_part(data, tmp_path):
    """{vision = 0} holds the tower still while the rest trains; 0.5 halves the projector's learning rate."""
    cfg = config(data, tmp_path / "lr", train__steps=3, optim__lr_scale='{vision = 0.0, "projector.*" = 0.5}')
    trainer = Trainer(cfg)
    scales = {round(g["lr_scale"], 3) for g in trainer.opt.param_groups}
    assert scales == {0.0, 0.5, 1.0}
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]) == k.startswith("vision_tower."), k
    base = next(g["lr"] for g in trainer.opt.param_groups if g["lr_scale"] == 1.0)
    assert base > 0
    for g in trainer.opt.param_groups:  # the last step's lr per group: the schedule's times the scale
        assert g["lr"] == pytest.approx(base * g["lr_scale"])
    with pytest.raises(ConfigError, match="lr_scale key 'vison' matches no parameter"):
        Trainer(config(data, tmp_path / "bad", optim__lr_scale="{vison = 0.1}"))


def test_warmstart_trains_only_the_vision_tower(data, tmp_path):
    cfg = config(data, tmp_path / "w", train__steps=1, warmstart__epochs=4, warmstart__batch_size=8,
                 warmstart__lr=3e-3, train__trainable=["decoder"])
    trainer = Trainer(cfg)
    decoder = {k: v.clone() for k, v in trainer.model.language_model.state_dict().items()}
    vision = {k: v.clone() for k, v in trainer.model.vision_tower.state_dict().items()}
    from palitorch.train.warmstart import warmstart

    out = warmstart(trainer.model, trainer.processor, trainer.raw_train, trainer.images, cfg, trainer.dist,
                    trainer.device, trainer._autocast)["warmstart"]
    assert out["heads"] == [3, 2] and out["images"] == 24  # colour and shape classifiers, one row per image
    assert all(torch.equal(v, decoder[k]) for k, v in trainer.model.language_model.state_dict().items())
    assert any(not torch.equal(v, vision[k]) for k, v in trainer.model.vision_tower.state_dict().items())
    assert not any(p.requires_grad for p in trainer.model.vision_tower.parameters())  # frozen again after


def test_labels_from_captions():
    from pathlib import Path

    from palitorch.train.data import Example
    from palitorch.train.warmstart import labels_from

    ex = [Example(Path("a"), "caption en", "red circle"), Example(Path("a"), "caption en", "red circle"),
          Example(Path("b"), "caption en", "blue"), Example(Path("c"), "answer en x", "yes")]
    chosen, labels, classes = labels_from(ex, "caption en")
    assert [e.image.name for e in chosen] == ["a", "b"] and classes == [["blue", "red"], ["circle"]]
    assert labels.tolist() == [[1, 0], [0, -100]]
    with pytest.raises(ConfigError, match="no training example has the prefix"):
        labels_from(ex, "describe")


def test_gradient_checkpointing_changes_nothing_and_bf16_runs(data, tmp_path):
    """Gemma 2 decoder from scratch; checkpointed activations give the same losses (1e-6); bf16 autocast trains."""
    base = {"model__version": 2, "train__steps": 3, "eval__final_max_examples": 2}
    Trainer(config(data, tmp_path / "plain", **base)).fit()
    Trainer(config(data, tmp_path / "ckpt", train__gradient_checkpointing=True, **base)).fit()
    Trainer(config(data, tmp_path / "bf16", train__bf16=True, **base)).fit()
    plain, ckpt, bf16 = (losses(tmp_path / n) for n in ("plain", "ckpt", "bf16"))
    for s in plain:
        assert abs(plain[s] - ckpt[s]) <= 1e-6
        assert abs(plain[s] - bf16[s]) <= 0.1 * plain[s]  # bf16 rounding: within 10% of the float32 loss
    assert palitorch.load(tmp_path / "bf16" / "model").cfg.version == 2


def test_setup_errors_are_one_line(data, tmp_path):
    from palitorch.errors import PalitorchError

    with pytest.raises(PalitorchError, match="does not exist"):
        Trainer(config(data, tmp_path / "a", model__init=str(tmp_path / "nope")))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="GPUs visible"):
            Trainer(config(data, tmp_path / "b", train__device="cuda"))


def test_dummy_prefix_tokenizer_smooth_locs_and_grouped_batches(data, tmp_path):
    """The bundled model's options: its tokenizer, loc init and batch grouping train a folder both libraries read."""
    cfg = config(data, tmp_path / "run", train__steps=6, model__dummy_prefix=True, model__smooth_locs=True,
                 model__split_punctuation=True, model__vocab_size=400, data__per_image=3)
    Trainer(cfg).fit()
    pipe = palitorch.load(tmp_path / "run" / "model")
    tok = pipe.processor.tokenizer
    # An answer word and the same word inside a question are one token; decoding gives the text back.
    answer = tok.encode("blue", add_special_tokens=False).ids
    question = tok.encode("what is the blue shape?", add_special_tokens=False).ids
    assert len(answer) == 1 and answer[0] in question
    assert pipe.processor.decode(tok.encode("blue circle", add_special_tokens=False).ids) == "blue circle"
    # The prompt's last token is the "\n" separator itself, whatever the question's last word.
    for prompt in ("what is the blue shape?\n", "is there a circle?\n", "caption en\n"):
        pieces = tok.encode(prompt, add_special_tokens=False).tokens
        assert pieces[-1] == "\n" and "\n" not in "".join(pieces[:-1]), pieces
    assert_loads_in_transformers(tmp_path / "run" / "model", pipe)


def test_smooth_loc_embeddings_are_ordinal():
    from palitorch.config import _tiny
    from palitorch.model import PaliGemma
    from palitorch.train.build import smooth_loc_embeddings

    model = PaliGemma(_tiny(1400))
    locs = list(range(300, 1324))
    smooth_loc_embeddings(model, locs, std=0.02, seed=0)
    w = torch.nn.functional.normalize(model.language_model.embed_tokens.weight.detach()[locs], dim=-1)

    def sim(d):
        return float((w[:-d] * w[d:]).sum(-1).mean())

    assert sim(1) > 0.95 and sim(1) > sim(16) > sim(64) > sim(256) and abs(sim(256)) < 0.2
    assert abs(float(model.language_model.embed_tokens.weight[locs].std()) - 0.02) < 0.002


def test_box_masks_mark_the_pixels_inside_each_box():
    from pathlib import Path

    from palitorch.train.data import Example
    from palitorch.train.warmstart import box_masks

    # 16 px image, 8 px patches: a box over pixel rows 2..9 and columns 4..5 (pixel edges 2/10 and 4/6).
    def loc(px):
        return f"<loc{round(px / 16 * 1023):04d}>"

    a, b = Example(Path("a"), "caption en", "red square"), Example(Path("b"), "caption en", "blue circle")
    ex = [a, b, Example(Path("a"), "detect square", f"{loc(2)}{loc(4)}{loc(10)}{loc(6)} square")]
    masks = box_masks(ex, [a, b], "detect", size=16, patch=8)
    assert masks.shape == (2, 4, 64)
    want = torch.zeros(16, 16)
    want[2:10, 4:6] = 1
    patches = want.reshape(2, 8, 2, 8).permute(0, 2, 1, 3).reshape(4, 64)  # row-major patches, as the tower's
    assert torch.equal(masks[0], patches) and bool((masks[1] == -1).all())  # b has no box: not scored
    assert masks[0, 0].sum() == 6 * 2 and masks[0, 2].sum() == 2 * 2  # rows 2..7 / 8..9 of columns 4..5


def test_box_edges_are_the_first_box_in_pixels():
    from pathlib import Path

    from palitorch.train.data import Example
    from palitorch.train.warmstart import box_edges

    def loc(px):
        return f"<loc{round(px / 16 * 1023):04d}>"

    a, b = Example(Path("a"), "caption en", "red square"), Example(Path("b"), "caption en", "blue circle")
    ex = [a, b, Example(Path("a"), "detect square", f"{loc(10)}{loc(4)}{loc(2)}{loc(6)} square; "
                                                      f"{loc(0)}{loc(0)}{loc(16)}{loc(16)} square")]
    edges = box_edges(ex, [a, b], "detect", size=16)
    assert edges.tolist() == [[2, 4, 10, 6], [-100] * 4]  # the first box, put in order; b has none


def test_warmstart_with_box_masks_learns_them(data, tmp_path):
    from palitorch.train.data import read_jsonl

    rows = [json.loads(r) for r in (data / "train.jsonl").read_text().splitlines()]
    for r in [r for r in rows if r["task"] == "caption"]:  # a box over the image's left half, per image
        rows.append({"image": r["image"], "prefix": "detect " + r["suffix"].split()[1],
                     "suffix": "<loc0000><loc0000><loc1023><loc0512> " + r["suffix"].split()[1], "task": "detect"})
    (data / "boxes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_jsonl(data / "boxes.jsonl")) == len(rows)
    cfg = config(data, tmp_path / "w", train__steps=1, warmstart__epochs=20, warmstart__batch_size=8,
                 warmstart__lr=1e-2, warmstart__boxes="detect", data__train=[str(data / "boxes.jsonl")])
    Trainer(cfg).fit()
    ws = [json.loads(r) for r in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines() if "warmstart" in r]
    out = ws[0]["warmstart"]
    assert out["heads"] == [3, 2, "box mask"]
    assert out["train_accuracy"][2] > 0.9  # the left half of each 8-px patch row: learnt from the positions
    # With the edge head too: every token learns the image's box edges (the same for every image here).
    Trainer(dataclasses.replace(cfg, warmstart=dataclasses.replace(cfg.warmstart, box_edges=True),
                                train=dataclasses.replace(cfg.train, out=str(tmp_path / "e")))).fit()
    ws = [json.loads(r) for r in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines() if "warmstart" in r]
    assert ws[0]["warmstart"]["heads"] == [3, 2, "box mask", "box edges"]
    assert ws[0]["warmstart"]["train_accuracy"][3] > 0.9
    with pytest.raises(ConfigError, match="box_edges needs boxes"):
        Trainer(config(data, tmp_path / "y", warmstart__epochs=1, warmstart__box_edges=True)).fit()
    with pytest.raises(ConfigError, match="has a box"):
        Trainer(config(data, tmp_path / "x", warmstart__epochs=1, warmstart__boxes="locate")).fit()


def test_late_mix_changes_what_later_steps_draw(data, tmp_path):
    from palitorch.train.data import global_batch

    cfg = config(data, tmp_path / "r", train__steps=4, data__late_from=2, data__late_task_repeat="{vqa = 0}",
                 eval__final_max_examples=2)
    trainer = Trainer(cfg)

    def tasks(step):
        d = trainer.data_at(step)
        return {d.examples[i].meta["task"] for i in global_batch(len(d), 8, 0, step, d.order)}

    assert tasks(0) | tasks(1) == {"caption", "vqa"}
    assert tasks(2) == tasks(3) == {"caption"}  # from step 2 on, no question is drawn
    trainer.fit()
    start = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["examples"] == 48 and start["late_examples"] == 24
    with pytest.raises(ConfigError, match="late_task_repeat"):
        config(data, tmp_path / "x", data__late_from=2)


def test_images_read_ahead_serve_only_the_step_they_were_read_for():
    """feed.Ahead reads step s + 1's images while step s runs; a call for any other step (the loop went elsewhere:
    a resume, a step asked for again) reads that step's own images instead of using the read-ahead."""
    from palitorch.train.feed import Ahead

    class Images:
        def batch(self, paths):
            return torch.tensor(paths)

    ahead = Ahead(Images(), lambda step: [[step, step]])
    try:
        assert ahead.get(0, 10)[0].tolist() == [0, 0]
        assert ahead.get(1, 10)[0].tolist() == [1, 1]  # the read-ahead
        assert ahead.get(5, 10)[0].tolist() == [5, 5]  # step 2 was read ahead: not used for step 5
        assert ahead.get(9, 10)[0].tolist() == [9, 9] and ahead._next is None  # nothing read past the last step
    finally:
        ahead.close()
