"""Helpers for the training tests: a tiny image dataset drawn with PIL, and small configs over it."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from palitorch.train.config import load_config

COLORS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 170, 20)}
SHAPES = ("circle", "square")


def make_data(folder: Path, n_train: int = 24, n_test: int = 8, size: int = 24, seed: int = 0) -> Path:
    """train.jsonl / test.jsonl: per image a caption (`red circle`) and a colour question; images under img/."""
    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            im = Image.new("RGB", (size, size), (250, 250, 250))
            x, y, s = rng.randint(1, size // 3), rng.randint(1, size // 3), rng.randint(size // 3, size // 2)
            (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(
                [x, y, x + s, y + s], fill=COLORS[color])
            rel = f"img/{split}{i}.png"
            im.save(folder / rel)
            rows.append({"image": rel, "prefix": "caption en", "suffix": f"{color} {shape}", "task": "caption"})
            rows.append({"image": rel, "prefix": "answer en what color is the shape?", "suffix": color,
                         "task": "vqa", "qtype": "color"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def config(data: Path, out: Path, **overrides):
    """A fast from-scratch config: tiny preset, 16 px images (4 patches), batch 8, per-step logging."""
    base = {
        "data.train": str(data / "train.jsonl"), "data.eval": str(data / "test.jsonl"), "train.out": str(out),
        "train.steps": 8, "train.batch_size": 8, "train.progress": False, "train.log_every": 1,
        "model.image_size": 16, "model.patch_size": 8, "model.vocab_size": 64, "optim.warmup_steps": 2,
        "eval.max_new_tokens": 12, "eval.batch_size": 16,  # (the longest answer: 9 tokens)
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    args = []
    for k, v in base.items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return load_config(None, args)


def losses(run: Path) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def crashing(at: int, base=None):
    """A Trainer class (or `base` subclass) whose train_step(`at`) raises KeyboardInterrupt: a Ctrl-C before step
    `at` + 1, after everything step `at` did (its checkpoint, its evaluation)."""
    from palitorch.train.loop import Trainer

    class Crash(base or Trainer):
        def train_step(self, step):
            if step == at:
                raise KeyboardInterrupt
            return super().train_step(step)

    return Crash
