"""The numbers a run is made of, each against its definition: the learning-rate schedule (as transformers computes
it), a step's gradient (the global batch's mean over suffix tokens however it is cut into micro-batches, then
clipped), the metrics rows, the data order trainer_state.json documents, the processes' shares, LoRA's layer math,
box IoU and the evaluation's figures (found by mutation testing: each of these could change without a test failing)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from palitorch.train import build, ddp, evaluate, lora
from palitorch.train.config import OptimConfig
from palitorch.train.data import Example, epoch_order, global_batch
from palitorch.train.loop import Trainer

from trainkit import config, losses

BOX = "<loc0000><loc0000><loc0100><loc0100> circle"


def test_the_schedule_warms_up_then_decays_to_its_floor():
    """Update s (0-based) of T: (s + 1) / warmup of lr during the warm-up (never 0), then transformers' cosine with
    a floor (get_cosine_with_min_lr_schedule_with_warmup), linear, or constant."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    total, warmup = 20, 4
    cos = OptimConfig(lr=2.0, warmup_steps=warmup, schedule="cosine", min_lr_ratio=0.1)
    assert [build.lr_at(s, total, cos) for s in range(warmup)] == [0.5, 1.0, 1.5, 2.0]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    ref = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1)
    want = []
    for _ in range(total + 1):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    for s in range(warmup, total + 1):  # (transformers' warm-up starts at 0: its step s is our s - 1 there)
        assert build.lr_at(s, total, cos) == pytest.approx(want[s], rel=1e-12), s
    assert build.lr_at(warmup + 8, total, cos) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway: the mean
    assert build.lr_at(total, total, cos) == pytest.approx(0.2)  # the floor: lr * min_lr_ratio
    linear = dataclasses.replace(cos, schedule="linear")
    assert build.lr_at(warmup + 4, total, linear) == pytest.approx(2.0 * (0.1 + 0.9 * 0.75))  # a quarter down
    assert build.lr_at(total, total, linear) == pytest.approx(0.2)
    constant = dataclasses.replace(cos, schedule="constant")
    assert [build.lr_at(s, total, constant) for s in range(warmup, total)] == [2.0] * (total - warmup)


def test_the_optimizer_takes_every_adamw_setting_of_the_config():
    """lr, betas (beta2 too: no test set it away from its default) and eps, on every parameter group."""
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    cfg = OptimConfig(lr=0.25, beta1=0.5, beta2=0.75, eps=1e-3, weight_decay=0.125)
    opt, _ = build.optimizer(model, cfg)
    assert [(g["lr"], g["betas"], g["eps"]) for g in opt.param_groups] == [(0.25, (0.5, 0.75), 1e-3)] * 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.125, 0.0]


def test_a_step_is_the_global_batch_mean_over_suffix_tokens_then_clipped(data, tmp_path):
    """Micro-batches of 3, 3 and 2 sequences (their suffix-token counts differ) give the gradient and loss of the
    whole batch in one piece; clipping scales that gradient to [optim] clip_grad_norm, and the row reports the norm
    before clipping."""
    cfg = config(data, tmp_path / "run", train__micro_batch_size=3, optim__clip_grad_norm=0.0, data__eval="")
    trainer = Trainer(cfg)
    grads = []
    trainer.opt.step = lambda *a, **k: grads.append([p.grad.clone() for p in trainer.params])  # (no update)
    assert [len(m) for m in trainer.micro_batches(0)] == [3, 3, 2]
    out = trainer.train_step(0)
    idx = global_batch(len(trainer.data), 8, cfg.train.seed, 0, trainer.data.order)
    assert len({int(trainer.data.targets[m].sum()) / len(m) for m in trainer.micro_batches(0)}) > 1
    whole = trainer.model(**trainer.data.batch(idx), return_logits=False)
    whole.loss.backward()
    assert out["loss"] == pytest.approx(float(whole.loss.detach()), rel=1e-6)
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params])))
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-5)
    for got, p in zip(grads[0], trainer.params):
        torch.testing.assert_close(got, p.grad, atol=1e-7, rtol=1e-4)
    trainer.model.zero_grad(set_to_none=True)
    limit = norm / 10
    trainer.cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, clip_grad_norm=limit))
    clipped = trainer.train_step(0)
    assert clipped["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the norm before clipping
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[1]]))) == pytest.approx(limit, rel=1e-4)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b / 10, atol=1e-8, rtol=1e-4)


def test_metrics_rows_average_their_steps_and_each_step_uses_its_learning_rate(data, tmp_path):
    """log_every = 2: a row's loss is the mean of its two steps' losses; update s uses lr_at(s) (0-based)."""
    seen = []

    class Recording(Trainer):
        def train_step(self, step):
            seen.append(super().train_step(step))
            return seen[-1]

    cfg = config(data, tmp_path / "run", train__steps=4, train__log_every=2, optim__warmup_steps=2, data__eval="")
    Recording(cfg).fit()
    rows = losses(tmp_path / "run")
    assert sorted(rows) == [2, 4]
    assert rows[2] == pytest.approx((seen[0]["loss"] + seen[1]["loss"]) / 2, rel=1e-12)
    assert rows[4] == pytest.approx((seen[2]["loss"] + seen[3]["loss"]) / 2, rel=1e-12)
    assert [o["lr"] for o in seen] == [build.lr_at(s, 4, cfg.optim) for s in range(4)]
    assert seen[0]["lr"] == pytest.approx(cfg.optim.lr / 2)  # the first update is half-way up the warm-up
    logged = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if "loss" in r] == [seen[1]["lr"], seen[3]["lr"]]


def test_the_data_order_is_the_one_trainer_state_documents():
    """trainer_state.json's data_order: epoch e is torch.randperm(n) seeded with seed * 1000003 + e, so runs of
    seeds s and s + 1 do not draw each other's epochs."""
    for seed, epoch in [(0, 0), (0, 1), (1, 0), (7, 3)]:
        want = torch.randperm(50, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
        assert torch.equal(epoch_order(50, seed, epoch), want), (seed, epoch)
    assert not torch.equal(epoch_order(50, 1, 0), epoch_order(50, 0, 1))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_the_processes_shares_cover_the_batch_once(world):
    for n in (world, 7, 8, 13):
        parts = [list(range(n))[ddp.shard(n, ddp.Dist(r, world))] for r in range(world)]
        assert sum(parts, []) == list(range(n)), (n, parts)  # contiguous, in rank order, nothing lost or repeated
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_lora_layer_is_w_plus_alpha_over_r_b_a():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base, rank=2, alpha=3.0, dropout=0.0, generator=g)
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), base(x))  # B starts at zero: training starts from the checkpoint's function
    assert layer.scale == 1.5 and layer.lora_a.abs().max() <= 1 / math.sqrt(6)
    with torch.no_grad():
        layer.lora_b.normal_()
    want = base(x) + 1.5 * (x @ layer.lora_a.T) @ layer.lora_b.T
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(layer.merged()(x), want)
    # Dropout masks the adapter's input in training only.
    drop = lora.LoRALinear(base, rank=2, alpha=3.0, dropout=0.5, generator=g)
    with torch.no_grad():
        drop.lora_b.normal_()
    plain = base(x) + 1.5 * (x @ drop.lora_a.T) @ drop.lora_b.T
    torch.testing.assert_close(drop.eval()(x), plain)
    assert not torch.allclose(drop.train()(x), plain)


def test_lora_draws_each_layers_a_apart_and_the_same_on_every_process(base):
    from palitorch.checkpoint import load_model

    def adapters(seed):
        model = load_model(base)
        lora.apply(model, ["language_model.layers.*"], 2, 4.0, 0.0, seed=seed)
        return {n: m.lora_a.detach().clone() for n, m in lora.wrapped(model)}

    a, again, other = adapters(0), adapters(0), adapters(1)
    assert all(torch.equal(a[n], again[n]) for n in a)  # every process draws the same A from the seed
    assert not torch.equal(a["language_model.layers.0.attn.q_proj"], a["language_model.layers.1.attn.q_proj"])
    assert not torch.equal(a["language_model.layers.0.attn.q_proj"], other["language_model.layers.0.attn.q_proj"])


def test_a_resumed_lora_run_with_dropout_follows_the_uninterrupted_one(data, base, tmp_path):
    """The adapters' dropout draws from the global generator: a resume restores it, so the masks (and the losses)
    are those of the run that was not interrupted."""
    over = {"model__init": str(base), "lora__rank": 4, "lora__alpha": 8.0, "lora__dropout": 0.3, "optim__lr": 3e-2,
            "optim__warmup_steps": 0, "optim__schedule": "constant", "data__eval": ""}
    Trainer(config(data, tmp_path / "whole", train__steps=4, **over)).fit()
    Trainer(config(data, tmp_path / "split", train__steps=2, **over)).fit()
    Trainer(config(data, tmp_path / "split", train__steps=4, **over), resume=True).fit()
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)


def test_box_iou_of_apart_boxes_and_the_half_overlap_threshold():
    from palitorch.train.evaluate import box_score, exact_match, iou

    assert iou((0, 0, 100, 100), (200, 300, 400, 500)) == 0.0  # apart along both axes
    assert iou((0, 0, 100, 100), (50, 200, 100, 300)) == 0.0
    assert iou((0, 0, 100, 100), (50, 50, 150, 150)) == pytest.approx(2500 / 17500)
    # The first predicted box is scored (its label too), not any later one.
    assert box_score(f"{BOX}; <loc0500><loc0500><loc0600><loc0600> square", BOX) == (1.0, 1.0)
    assert box_score("<loc0500><loc0500><loc0600><loc0600> square; " + BOX, BOX) == (0.0, 0.0)
    # IoU exactly 0.5 with the right label counts ("IoU >= 0.5").
    half = "<loc0000><loc0000><loc0100><loc0200> circle"
    ex = [Example(Path("a"), "detect circle", BOX, {"task": "detect"})]
    m = exact_match(nn.Linear(1, 1), None, ex, [0], 1, 8, [], ddp.Dist(), lambda im, p, k: [half])
    assert m["boxes"] == {"n": 1, "mean_iou": 0.5, "label_and_iou50": 1.0}


def test_each_process_evaluates_its_own_examples_and_the_loss_is_per_token(data, tmp_path, monkeypatch):
    """Two processes' per-example scores are disjoint and add up to one process's; the eval loss is the mean over
    all suffix tokens, whatever the batch size."""
    ex = [Example(Path(str(i)), "answer en q", "yes", {"task": "vqa"}) for i in range(5)]
    sent = []
    monkeypatch.setattr(ddp, "all_reduce_sum", lambda t, d: sent.append(t.clone()) or t)

    def gen(images, prompts, k):
        return ["yes" if int(p.name) % 2 else "no" for p in images]

    stub = nn.Linear(1, 1)
    whole = evaluate.exact_match(stub, None, ex, list(range(5)), 2, 4, ["task"], ddp.Dist(), gen)
    assert whole["exact_match"] == pytest.approx(0.4)
    for rank in (0, 1):
        evaluate.exact_match(stub, None, ex, list(range(5)), 2, 4, ["task"], ddp.Dist(rank, 2), gen)
    assert torch.equal(sent[1] + sent[2], sent[0])
    monkeypatch.undo()
    trainer = Trainer(config(data, tmp_path / "run", train__steps=1))
    idx = list(range(7))
    one = evaluate.loss(trainer.model, trainer.eval_data, idx, 16, ddp.Dist(), trainer._autocast)
    assert evaluate.loss(trainer.model, trainer.eval_data, idx, 3, ddp.Dist(), trainer._autocast) == \
        pytest.approx(one, rel=1e-6)
