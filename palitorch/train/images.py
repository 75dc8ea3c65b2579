"""Training images by path: decoded and resized once as uint8 [3, S, S], checked before the first step.

Before step 1 the trainer reads its images on threads (Pillow releases the GIL while it decodes): with
`[data] cache_images` (the default) it decodes every image this process's steps and evaluations will use into the
cache, the work the first epoch would do anyway; without the cache it opens every image's header (cheap). An
unreadable image is then an error at startup naming the JSONL lines that use it, not hours into the run; one that
fails later (a file changed under the run) names them too. The cache holds 3 * S * S bytes per image and process:
~150 KB at 224 px, ~600 KB at 448.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from PIL import Image

from palitorch.errors import ConfigError, InputError
from palitorch.inference.images import check_image_file, resize_image

LINES_SHOWN = 3  # JSONL lines named in an error; the rest are counted


class ImageError(ConfigError):
    """An image that cannot be read, naming the JSONL lines that use it. Met by one process under torchrun (each
    reads its own share of a batch), so the trainer has every process say it, not only the first."""


@functools.cache
def _pool():
    """One pool of decoding threads for the process, made on first use."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="palitorch-images")


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: it makes its own pool
    os.register_at_fork(after_in_child=_pool.cache_clear)


class Images:
    """Images by path as uint8 [3, S, S], resized as Processor.pixels resizes them; kept in memory with `cache`."""

    def __init__(self, size: int, cache: bool = True, resample: int = Image.Resampling.BICUBIC):
        self.size, self.cache, self.resample = size, cache, resample  # (the processor's: its checkpoint's filter)
        self._store: dict[Path, torch.Tensor] = {}
        self._lines: dict[Path, dict[str, None]] = {}  # path -> the JSONL lines ("file:n") that use it, in order

    def register(self, examples) -> None:
        """Note which JSONL lines use each image (Example.where; Example.image a path or a tuple of them), for the
        error messages."""
        for e in examples:
            for path in e.image if isinstance(e.image, tuple) else (e.image,):
                self._lines.setdefault(path, {})[e.where] = None

    @property
    def paths(self) -> list[Path]:
        """Every registered image, in the order first used (file order)."""
        return list(self._lines)

    def used_by(self, path: Path) -> str:
        """'a.jsonl:4, a.jsonl:9 (and 3 more lines): ' for the lines using `path`; '' for an unregistered path."""
        lines = list(self._lines.get(path, ()))
        more = len(lines) - LINES_SHOWN
        return (", ".join(lines[:LINES_SHOWN]) + (f" (and {more} more line{'s' * (more > 1)})" if more > 0 else "")
                + ": ") if lines else ""

    def decode(self, path: Path) -> torch.Tensor:
        """Decode and resize one image; an ImageError naming its JSONL lines if it cannot be read."""
        try:
            return resize_image(path, self.size, self.resample).contiguous()
        except InputError as e:
            raise ImageError(f"{self.used_by(path)}{e}") from None

    def get(self, path: Path) -> torch.Tensor:
        t = self._store.get(path)
        if t is None:
            t = self.decode(path)
            if self.cache:
                self._store[path] = t
        return t

    def batch(self, paths: list[Path]) -> torch.Tensor:
        """[B, 3, S, S] uint8; images not in the cache are decoded on threads (the first unreadable one, in `paths`
        order, raises)."""
        missing = [p for p in dict.fromkeys(paths) if p not in self._store]
        fresh = dict(zip(missing, _pool().map(self.decode, missing))) if len(missing) > 1 else {}
        if self.cache:
            self._store.update(fresh)
        return torch.stack([fresh[p] if p in fresh else self.get(p) for p in paths])

    def preload(self, paths: list[Path], progress=None) -> Path | None:
        """Decode `paths` into the cache on threads. Returns the first (in `paths` order) that cannot be read, None
        if all could: the caller raises its error (`decode`), under torchrun the same one on every process."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._store]
        done = 0
        try:
            for p, t in zip(todo, _pool().map(self.decode, todo)):
                self._store[p] = t
                done += 1
                if progress is not None:
                    progress.update(1)
        except ImageError:
            return todo[done]
        return None

    def check_headers(self, paths: list[Path], progress=None) -> None:
        """Open every image's header on threads (format and size, no pixels): an ImageError naming the first
        unreadable one (in `paths` order) and its JSONL lines."""
        for _ in _pool().map(self._check_header, paths):
            if progress is not None:
                progress.update(1)

    def _check_header(self, path: Path) -> None:
        try:
            check_image_file(path)
        except InputError as e:
            raise ImageError(f"{self.used_by(path)}{e}") from None
