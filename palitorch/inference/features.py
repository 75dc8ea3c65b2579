"""The vision tower's output for images a pipeline has seen lately, so that an image asked about again skips the tower.

A PaliGemma prompt starts with its image's P features (SigLIP's output through the projector, [P, H]). They depend on
the image alone, not on the prompt: every request about the same image (a chat's next prompt, a server client's next
question about the picture it sent before, a batch job's later rows) needs the same features. The prefix's keys and
values cannot be reused the same way: the prefix attends both ways, so its image tokens' keys depend on the prompt.

`FeatureCache` keeps the features of the images encoded last, on the model's device, up to a number of bytes (least
recently used first out), keyed by the image as the model sees it: the bytes of its resized uint8 pixels (so the
same picture from a path, a PIL image or a URL is one entry, and two whose resized pixels differ anywhere are two),
together with the vision weights' identity and version counters (a training step or `load_state_dict` changes
them in place; the entries made before then no longer match). Changes made through `.data` bypass the version
counters: call `clear()` after those.

A hit gives the numbers the tower computed for that image earlier, in whatever batch it came in. On the CPU a
SigLIP row's result has not been seen to depend on the other images of its batch (tests/inference/
test_feature_cache.py compares them bit for bit; so did a check of the 200M benchmark model in float32 and
bfloat16), so a hit gives a fresh encoding's numbers, up to the float rounding by which two encodings of one image
can differ at all (~1e-7, seen once on a process's first calls, whose kernels are still being chosen); on a GPU
(cuBLAS picks kernels by shape) up to float rounding too.

`Images` is a batch's images waiting to be encoded: resized on the host when the request is prepared, through the
tower (the misses only, once each) when the prefill first asks for `features()`, under the pipeline's lock.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict

import torch
from torch import Tensor, nn

from palitorch.errors import InputError

DEFAULT_BYTES = 128 << 20  # 64 images at 224 px for a 3B model in float32 (2 MB each), 4 at 896 px (32 MB each)


class FeatureCache:
    """Image features by image, least recently used out first, within `max_bytes` (0: keep none). Thread-safe.
    `hits` and `misses` count the images looked up since it was made or last cleared."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        self._entries: OrderedDict[tuple, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0
        self.max_bytes = 0
        self.resize(max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"FeatureCache({len(self)} images, {self.bytes / 2**20:.1f} of {self.max_bytes / 2**20:.0f} MB, "
                f"{self.hits} hits, {self.misses} misses)")

    def resize(self, max_bytes: int) -> None:
        """Keep at most `max_bytes` of features from now on (0 turns the cache off), dropping the oldest as needed."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InputError(f"a feature cache's size must be a whole number of bytes >= 0, not {max_bytes!r}")
        with self._lock:
            self.max_bytes = max_bytes
            self._trim()

    def clear(self) -> None:
        """Forget every entry, and the counts of hits and misses."""
        with self._lock:
            self._entries.clear()
            self.bytes = self.hits = self.misses = 0

    def get(self, key: tuple) -> Tensor | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple, features: Tensor) -> None:
        """Keep `features` (a tensor of its own: not a view that would hold on to a whole batch's memory)."""
        size = features.numel() * features.element_size()
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = features
            self.bytes += size
            self._trim()

    def _trim(self) -> None:
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def weights_stamp(modules: list[nn.Module]) -> tuple:
    """What the cached features were computed with: each parameter's identity, storage and version counter."""
    return tuple((id(p), p.data_ptr(), p._version) for m in modules for p in m.parameters())


def image_key(resized: Tensor) -> tuple:
    """One resized image (uint8 [3, S, S] on the host) -> its key: shape and a 128-bit digest of its bytes."""
    return (*resized.shape, hashlib.blake2b(resized.contiguous().numpy().tobytes(), digest_size=16).digest())


class Images:
    """The U distinct images of a batch, resized (uint8 [U, 3, S, S] on the host), waiting for `model`'s vision tower:
    `features()` -> [U, P, H] in the model's dtype on its device, through `cache` (computed once per object; the
    tower normalises with `processor`, on the device)."""

    def __init__(self, resized: Tensor, model: nn.Module, processor, cache: FeatureCache):
        self.resized, self.model, self.processor, self.cache = resized, model, processor, cache
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._features: Tensor | None = None

    def features(self) -> Tensor:
        if self._features is None:
            self._features = self._encoded()
        return self._features

    def _encode(self, resized: Tensor) -> Tensor:
        """uint8 pixels [M, 3, S, S] on the host -> image features [M, P, H]."""
        return self.model.embed_image(self.processor.normalize(resized.to(self.device)).to(self.dtype))

    def _encoded(self) -> Tensor:
        if self.cache.max_bytes == 0:
            return self._encode(self.resized)
        stamp = weights_stamp([self.model.vision_tower, self.model.projector])
        keys = [(stamp, image_key(r)) for r in self.resized]
        first: dict[tuple, int] = {}  # each image's first place in the batch, in order
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        found = {k: f for k in first if (f := self.cache.get(k)) is not None}
        todo = [i for k, i in first.items() if k not in found]  # each missing image once, in order
        fresh = self._encode(self.resized[todo]) if todo else None
        for i, f in zip(todo, fresh if todo else ()):
            found[keys[i]] = f
            self.cache.put(keys[i], f.clone())  # (its own memory: a view would keep the whole batch's alive)
        if len(todo) == len(keys):  # (all distinct and new: the batch's own tensor is the answer)
            return fresh
        return torch.stack([found[k] for k in keys])


def distinct_images(images: list) -> tuple[list, list[int] | None]:
    """Inputs' images in order -> (the distinct ones, each input's index into them, or None when all are distinct).
    The same object, or the same path, counts once (one image with a list of prompts is preprocessed once)."""
    slot, distinct, index = {}, [], []
    for im in images:
        key = os.fspath(im) if isinstance(im, (str, os.PathLike)) else id(im)
        if key not in slot:
            slot[key] = len(distinct)
            distinct.append(im)
        index.append(slot[key])
    return distinct, None if len(distinct) == len(images) else index


def image_input(pixels: Tensor | Images) -> Tensor:
    """What `PaliGemma.embed` takes for a batch's images: pixels as given, or an `Images`' features."""
    return pixels.features() if isinstance(pixels, Images) else pixels
