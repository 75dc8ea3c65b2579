"""The vision warm-start's targets (which detection answers give boxes, masks and edges) and its bookkeeping: the
number of steps, the loss each head adds (checked at step 1, where zero-initialised heads give known values) and
the last epoch's accuracy, counted over the labelled images only."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from palitorch.train.data import Example
from palitorch.train.loop import Trainer
from palitorch.train.warmstart import box_edges, box_masks, detection_boxes, warmstart

from trainkit import config


def loc(px, size=16):
    """The <loc> token of pixel edge `px` of a `size` px image."""
    return f"<loc{round(px / size * 1023):04d}>"


def test_detection_boxes_take_the_prefix_and_the_prefixes_it_starts_as_a_word():
    """`boxes = "detect"` takes `detect` and `detect circle`, not `detector` (another task that shares letters)."""
    a, b, c = Path("a"), Path("b"), Path("c")
    ex = [Example(a, "detect", f"{loc(0)}{loc(0)}{loc(8)}{loc(8)} circle"),
          Example(a, "detect square", f"{loc(8)}{loc(8)}{loc(16)}{loc(16)} square"),
          Example(b, "detector", f"{loc(0)}{loc(0)}{loc(4)}{loc(4)} thing"),
          Example(c, "caption en", "red circle")]
    got = detection_boxes(ex, "detect")
    assert list(got) == [a]  # b's answer has another prefix, c has none
    assert got[a] == [(0, 0, 512, 512), (512, 512, 1023, 1023)]  # in order: the exact prefix's first


def test_box_masks_are_the_union_of_the_boxes_whichever_corner_comes_first():
    """Two boxes of one image mark both; a box written bottom-right corner first (y1 < y0, x1 < x0) marks the same
    pixels as written top-left first (box_edges orders its corners too)."""
    a = Example(Path("a"), "caption en", "red square")
    ex = [a, Example(Path("a"), "detect square", f"{loc(10)}{loc(6)}{loc(2)}{loc(4)} square; "
                                                 f"{loc(12)}{loc(8)}{loc(14)}{loc(16)} square")]
    want = torch.zeros(16, 16)
    want[2:10, 4:6] = 1  # rows 2..9, columns 4..5 (the first box, its corners swapped)
    want[12:14, 8:16] = 1  # rows 12..13, columns 8..15
    patches = want.reshape(2, 8, 2, 8).permute(0, 2, 1, 3).reshape(4, 64)
    assert torch.equal(box_masks(ex, [a], "detect", size=16, patch=8)[0], patches)


def test_box_edges_of_locs_past_the_grid_stop_at_the_image_side():
    """A <loc> token reads as any four digits (<loc2000> too): its edge is clamped to S, the largest class of the
    edge head (S + 1 classes), where an unclamped one would be a class that head does not have."""
    a = Example(Path("a"), "caption en", "red square")
    ex = [a, Example(Path("a"), "detect square", f"{loc(2)}{loc(4)}<loc2000><loc9999> square")]
    assert box_edges(ex, [a], "detect", size=16).tolist() == [[2, 4, 16, 16]]


class Bar:
    """A progress bar that keeps the loss each step shows."""

    def __init__(self, total, desc):
        self.total, self.losses = total, []

    def update(self, n):
        pass

    def set_postfix(self, loss, refresh):
        self.losses.append(float(loss))

    def close(self):
        pass


@pytest.fixture(scope="module")
def trainer(data, tmp_path_factory):
    """A from-scratch model of 16 px images in 8 px patches: 4 patch tokens of 64 pixels each."""
    return Trainer(config(data, tmp_path_factory.mktemp("ws") / "run", train__steps=1))


def run(trainer, examples, init_std=0.02, augment=None, optim=None, **ws):
    """Warm-start a copy of the trainer's tower; the result, the progress bar (its per-step losses) and the tower."""
    import copy

    cfg = trainer.cfg
    cfg = dataclasses.replace(cfg, warmstart=dataclasses.replace(cfg.warmstart, **ws),
                              model=dataclasses.replace(cfg.model, init_std=init_std),
                              augment=dataclasses.replace(cfg.augment, **(augment or {})),
                              optim=dataclasses.replace(cfg.optim, **(optim or {})))
    bars = []

    def progress(total, desc):
        bars.append(Bar(total, desc))
        return bars[-1]

    model = copy.deepcopy(trainer.model)
    out = warmstart(model, trainer.processor, examples, trainer.images, cfg, trainer.dist, trainer.device,
                    trainer._autocast, progress)["warmstart"]
    assert len(bars[0].losses) == bars[0].total == out["steps"]
    return out, bars[0], model.vision_tower


def labelled(trainer):
    """Per image a `label` example: its colour; on every other image a second word (one class: `thing`), and on
    every other of those a third (`big` or `small`): 24, 12 and 6 labelled images."""
    images = list(dict.fromkeys(e.image for e in trainer.raw_train))
    colour = {e.image: e.suffix.split()[0] for e in trainer.raw_train if e.prefix == "caption en"}
    words = ["", " thing", "", " thing big", "", " thing", "", " thing small"]
    return [Example(im, "label", colour[im] + words[i % 8]) for i, im in enumerate(images)]


def test_warmstart_steps_are_its_epochs_of_batches_rounded_up(trainer):
    """24 images in batches of 8: 3 steps an epoch, 1.5 epochs 5 steps (4.5 rounded up); a batch larger than the
    images takes them all, one step an epoch."""
    ex = labelled(trainer)
    assert run(trainer, ex, prefix="label", epochs=1.5, batch_size=8)[0]["steps"] == 5
    out, *_ = run(trainer, ex, prefix="label", epochs=2, batch_size=64)
    assert out["steps"] == 2 and out["images"] == 24


def test_warmstart_accuracy_is_the_last_epochs_over_the_labelled_images(trainer):
    """The second head has one class (`thing`), given on half the images: over those it is right every time, so
    its accuracy is exactly 1 when counted over the labelled images of the last epoch (here its only step)."""
    out, *_ = run(trainer, labelled(trainer), prefix="label", epochs=2, batch_size=64)
    assert out["heads"] == [3, 1, 2]
    assert out["train_accuracy"][1] == 1.0


def test_each_head_adds_its_mean_loss_over_the_images_it_scores(trainer):
    """With zero-initialised heads every logit of step 1 is 0: a classifier of C classes adds log C (its mean over
    the images with a label, not over the batch), the box mask log 2 (over the images with a box, not those
    without), the box edges box_edges_weight * log(S + 1). Tolerance 1e-4: the bar shows 4 decimals."""
    ex = labelled(trainer)
    boxed = [e.image for e in ex[::3]]  # a box on a third of the images: the others are not scored
    ex += [Example(im, "detect", f"{loc(0)}{loc(0)}{loc(16)}{loc(8)} shape") for im in boxed]
    out, bar, _ = run(trainer, ex, init_std=0.0, prefix="label", epochs=1, batch_size=64, boxes="detect",
                   box_edges=True, box_edges_weight=0.5)
    assert out["heads"] == [3, 1, 2, "box mask", "box edges"] and out["steps"] == 1
    heads = math.log(3) + math.log(1) + math.log(2)
    assert bar.losses[0] == pytest.approx(heads + math.log(2) + 0.5 * math.log(17), abs=1e-4)
    # The one step is the last epoch: its accuracy is that of all-zero logits, whose argmax is class 0 (`blue`,
    # `thing`, `big`: 3 of the 6 third words), the mask "outside" (the box is the left half: 1/2 of the pixels of
    # each boxed image) and the edges 0 (right for y0 and x0, wrong for y1 = 16 and x1 = 8), exactly.
    blue = sum(e.suffix.startswith("blue ") or e.suffix == "blue" for e in ex if e.prefix == "label") / 24
    assert out["train_accuracy"] == [blue, 1.0, 0.5, 0.5, 0.5]


def test_a_batch_with_no_image_of_a_word_adds_nothing_for_its_head(trainer):
    """A word that few captions have (here one image in 24) leaves most batches without a label for its head: that
    head adds 0 to those steps' loss (it was 0 / 0, a NaN on the progress bar; the tower stayed finite)."""
    images = list(dict.fromkeys(e.image for e in trainer.raw_train))
    colour = {e.image: e.suffix.split()[0] for e in trainer.raw_train if e.prefix == "caption en"}
    ex = [Example(im, "label", colour[im] + (" rare" if i == 0 else "")) for i, im in enumerate(images)]
    out, bar, tower = run(trainer, ex, prefix="label", epochs=1, batch_size=4)
    assert out["heads"] == [3, 1] and out["steps"] == 6
    assert all(math.isfinite(v) for v in bar.losses), bar.losses
    assert all(torch.isfinite(p).all() for p in tower.parameters())


def test_warmstart_images_are_augmented_as_the_main_loop_s(trainer):
    """[augment] changes the warm-start's images too (the tower learns from what the main loop will show it), and
    the same settings give the same tower (the augmentation draws from the seed): equal to the bit."""
    ex = labelled(trainer)
    over = {"prefix": "label", "epochs": 1, "batch_size": 8}
    plain = run(trainer, ex, **over)[2].state_dict()
    bright, again = (run(trainer, ex, augment={"brightness": 0.5}, **over)[2].state_dict() for _ in range(2))
    assert all(torch.equal(bright[k], again[k]) for k in bright)
    assert any(not torch.equal(bright[k], plain[k]) for k in bright)


def test_warmstart_clips_gradients_as_optim_says(trainer):
    """[optim] clip_grad_norm holds for the warm-start too: clipped to 1e-4 (every step's norm is far above it, by a
    factor that changes from step to step, which AdamW's moments do not cancel) the tower ends elsewhere than
    unclipped; clipped twice alike, at the same place, to the bit."""
    ex = labelled(trainer)
    over = {"prefix": "label", "epochs": 2, "batch_size": 8}
    free = run(trainer, ex, optim={"clip_grad_norm": 0.0}, **over)[2].state_dict()
    clipped, again = (run(trainer, ex, optim={"clip_grad_norm": 1e-4}, **over)[2].state_dict() for _ in range(2))
    assert all(torch.equal(clipped[k], again[k]) for k in clipped)
    assert any(not torch.equal(clipped[k], free[k]) for k in clipped)
