"""What the training loop reads ahead of time: the run's images before step 1, each step's images one step early.

`read_images` makes an unreadable image an error at startup (see images.py). `Ahead` reads step s + 1's images (a
uint8 stack per micro-batch, decoded on threads) on one background thread while step s computes. Only the reading
moves there (Pillow releases the GIL); the batch's arithmetic (augmentation, normalisation) stays on the loop's
thread, so the tensors are the ones reading in turn gives, and an error raised on the thread reaches the loop as it
is, at the step that needed the image.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from palitorch.train import ddp, evaluate
from palitorch.train.data import step_examples
from palitorch.train.images import Images


def read_images(images: Images, wanted: set[Path] | None, d: ddp.Dist, device: torch.device, show: bool) -> None:
    """Before step 1: with the cache (`wanted`, the images this process will use) decode them into it; without
    (`wanted` None) open every image's header. The first unreadable image raises an ImageError naming its JSONL
    lines; under torchrun each process decodes its own images and all raise the first failure of any of them."""
    paths = images.paths
    todo = paths if wanted is None else [p for p in paths if p in wanted]
    with tqdm(total=len(todo), desc="images", dynamic_ncols=True, disable=not show) as bar:
        if wanted is None:
            images.check_headers(todo, bar)  # the same paths on every process: the same first failure
            return
        failed = images.preload(todo, bar)
    if d.enabled:
        first = torch.tensor(paths.index(failed) if failed else len(paths), device=device)
        first = int(ddp.all_reduce_min(first, d))
        failed = paths[first] if first < len(paths) else None
    if failed is not None:
        images.decode(failed)  # raises its error (should a second try read it, the run goes on without it cached)


def wanted_images(trainer) -> set[Path]:
    """The images a Trainer's process will read from its current step on: its shares of the remaining steps'
    batches (train_step), the warm-start's, and its shares of the evaluations' (evaluate)."""
    cfg, t, d = trainer.cfg, trainer.cfg.train, trainer.dist
    part = ddp.shard(t.batch_size, d)
    late = cfg.data.late_from if trainer.late_data is not None else trainer.total
    spans = [(trainer.data, trainer.step, min(late, trainer.total)),
             (trainer.late_data, max(trainer.step, late), trainer.total)]
    wanted = {p for data, lo, hi in spans if data is not None and lo < hi
              for i in step_examples(data, t.batch_size, t.seed, lo, hi, part) for p in data.examples[i].images}
    if trainer.warmstarts():
        wanted |= {p for e in trainer.raw_train for p in e.images}
    e, ex = cfg.eval, trainer.eval_examples
    sizes = [e.final_max_examples] + ([e.max_examples] if trainer.periodic_evals() else [])
    return wanted | {p for k in sizes if ex for i in evaluate.subset(len(ex), k, t.seed)[d.rank::d.world]
                     for p in ex[i].images}


class Ahead:
    """Each step's images, read while the step before computes: `paths(step)` lists each micro-batch's images."""

    def __init__(self, images: Images, paths: Callable[[int], list[list[Path]]], enabled: bool = True):
        self.images, self.paths, self.enabled = images, paths, enabled
        self._pool: ThreadPoolExecutor | None = None
        self._next: tuple[int, Future] | None = None

    def get(self, step: int, last: int) -> list[torch.Tensor]:
        """Step `step`'s images, [U, 3, S, S] uint8 per micro-batch (read ahead if the previous call asked for
        `step` - 1); then start reading step + 1's unless it is `last` or beyond."""
        ahead, self._next = self._next, None
        stacks = ahead[1].result() if ahead is not None and ahead[0] == step else self.read(self.paths(step))
        if self.enabled and step + 1 < last:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="palitorch-batches")
            self._next = (step + 1, self._pool.submit(self.read, self.paths(step + 1)))
        return stacks

    def read(self, groups: list[list[Path]]) -> list[torch.Tensor]:
        return [self.images.batch(g) for g in groups]

    def close(self) -> None:
        """Drop what is being read (a read in progress finishes on its thread, unused)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._next = None, None
