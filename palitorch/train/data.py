"""Training data: JSONL examples, a deterministic batch order, augmentation (the images: images.py).

A JSONL line is `{"image": path, "prefix": text, "suffix": text}` (big_vision's layout); image paths are relative
to the JSONL file's folder unless absolute. An example about several images (NLVR2's pairs, video frames) gives a list
of 1 to 16 paths: as for `Pipeline.generate([[a, b]], ...)`, its prompt gets one `<image>` marker per image and the
images' tokens come one after another. Other fields (`task`, `qtype`, ...) are kept for per-group metrics; an
"answers" list, where given, holds the reference answers evaluation compares with (VQAv2's ten, several captions).

The batch order is a pure function of (seed, epoch): a seeded permutation cut into global batches (the incomplete
tail is dropped), so step s always sees the same examples, whether the run was resumed or split over processes.

Axes: B batch, T sequence length, S image side.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from palitorch.errors import ConfigError, InputError
from palitorch.inference.inputs import marked_prompts
from palitorch.inference.processor import MAX_IMAGES, Encoded, Processor
from palitorch.train.config import AugmentConfig
from palitorch.train.images import Images


@dataclass
class Example:
    image: Path | tuple[Path, ...]  # (a tuple: the example's several images, in order, as the file lists them)
    prefix: str
    suffix: str
    meta: dict = field(default_factory=dict)  # every other JSONL field (task, qtype, ...)
    where: str = ""  # "file.jsonl:12", for error messages
    given_image: str | list[str] = ""  # "image" as the file writes it (`image` is resolved against its folder)

    @property
    def images(self) -> tuple[Path, ...]:
        """The example's images in order (one or several)."""
        return self.image if isinstance(self.image, tuple) else (self.image,)


def read_jsonl(path: str | Path) -> list[Example]:
    """Parse one JSONL file; a bad line raises a ConfigError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        what = ("is a folder: give a JSONL file" if p.is_dir() else "does not exist" if not p.exists()
                else "is not a regular file (a device or a pipe): give a JSONL file")
        raise ConfigError(f"data file {str(p)!r} {what}")
    out = []
    with p.open("rb") as f:  # bytes, so that a line that is not UTF-8 is reported with its number
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            if n == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (some editors write one)
            try:
                d = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise ConfigError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
            if isinstance(d, dict) and isinstance(d.get("image"), list):
                _check_list(d["image"], where)
            elif not isinstance(d, dict) or not isinstance(d.get("image"), str):
                d = None  # (the message below)
            if d is None or not all(isinstance(d.get(k), str) for k in ("prefix", "suffix")):
                raise ConfigError(f'{where}: each line needs string fields "image", "prefix" and "suffix" ("image" '
                                  f"may be a list of 1 to {MAX_IMAGES} paths for an example about several images)")
            # JSON's "\ud800" escape gives a string that no UTF-8 file, tokenizer or print takes
            if b"\\u" in line and (bad := _not_unicode(d)):
                raise ConfigError(f'{where}: "{bad}" holds a lone surrogate escape such as \\ud800, which is no '
                                  "Unicode character: write the text itself, as UTF-8")
            if not isinstance(d.get("task", ""), str):  # (task_repeat and the metrics' groups key on it)
                raise ConfigError(f'{where}: "task" must be a string such as "caption", got {json.dumps(d["task"])}')
            answers = d.get("answers")  # (the references evaluation compares with, where given: train/evaluate.py)
            if answers is not None and not (isinstance(answers, list) and answers and
                                            all(isinstance(a, str) for a in answers)):
                raise ConfigError(f'{where}: "answers" must be a non-empty list of strings (the reference answers '
                                  f"evaluation compares with), got {json.dumps(answers)[:60]}")
            given = d.pop("image")
            found = tuple(Path(g) if Path(g).is_absolute() else p.parent / g for g in
                          (given if isinstance(given, list) else [given]))
            image = found if isinstance(given, list) else found[0]
            out.append(Example(image, d.pop("prefix"), d.pop("suffix"), d, where, given))
    if not out:
        raise ConfigError(f"data file {p} has no examples")
    return out


def _check_list(given: list, where: str) -> None:
    """ConfigError unless a line's "image" list holds 1 to MAX_IMAGES path strings."""
    if not given:
        raise ConfigError(f'{where}: "image" is an empty list: give a path, or a list of 1 to {MAX_IMAGES} paths')
    if len(given) > MAX_IMAGES:
        raise ConfigError(f'{where}: "image" lists {len(given)} images; at most {MAX_IMAGES} per example (their '
                          "tokens share the model's context)")
    for j, g in enumerate(given):
        if not isinstance(g, str):
            raise ConfigError(f'{where}: "image" item {j + 1} is {json.dumps(g)[:40]}: each image must be a path '
                              "string")


def _not_unicode(d: dict) -> str | None:
    """The first field of a parsed line whose key or value (nested too) holds a lone surrogate, else None."""
    for k, v in d.items():
        try:
            json.dumps({k: v}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return k.encode("utf-8", "replace").decode()
    return None


def fingerprint(files: list[str]) -> str:
    """A hash of the training files' bytes: a resumed run refuses data that changed under it."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def repeat_by_task(examples: list[Example], repeat: dict[str, int]) -> list[Example]:
    """Each example `repeat[task]` times per epoch (default once), e.g. {caption = 4}; a key that is no task of
    `examples` (a typo such as "captoin") raises a ConfigError listing the tasks."""
    tasks = {e.meta.get("task", "") for e in examples}
    for k in repeat:
        if k not in tasks:
            have = ", ".join(sorted(t for t in tasks if isinstance(t, str) and t)) or 'none (no "task" field)'
            raise ConfigError(f"[data] task_repeat / late_task_repeat: no training example has task {k!r}; "
                              f"its tasks are: {have}")
    out = []
    for e in examples:
        out += [e] * repeat.get(e.meta.get("task", ""), 1)
    return out


def augment(images: torch.Tensor, cfg: AugmentConfig, seed: int, step: int, positions) -> torch.Tensor:
    """Photometric jitter of uint8 [B, 3, S, S] -> uint8; `positions` gives each image an integer key.

    Each image's random draws depend only on (seed, step, its key): its position in the global batch, or (training
    batches, where sequences share images) a hash of its path. The result therefore does not depend on how the batch
    is split over processes or micro-batches.
    """
    x = images.float() / 255.0
    for j, pos in enumerate(positions):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step + 65_537 * pos + 1)
        u = torch.rand(3, generator=g) * 2 - 1  # uniform in [-1, 1]: brightness, contrast, saturation
        im = x[j]
        if cfg.brightness > 0:
            im = im * (1 + cfg.brightness * u[0])
        if cfg.contrast > 0:
            m = im.mean()
            im = (im - m) * (1 + cfg.contrast * u[1]) + m
        if cfg.saturation > 0:
            grey = 0.299 * im[0:1] + 0.587 * im[1:2] + 0.114 * im[2:3]
            im = (im - grey) * (1 + cfg.saturation * u[2]) + grey
        if cfg.noise > 0:
            im = im + cfg.noise * torch.randn(im.shape, generator=g)
        x[j] = im
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def augments(cfg: AugmentConfig) -> bool:
    return any(v > 0 for v in (cfg.brightness, cfg.contrast, cfg.saturation, cfg.noise))


class Dataset:
    """Examples with their token ids pre-encoded once, and the images they point to.

    `max_length` > 0 refuses (naming the line) an example longer than that many tokens, image tokens included.
    """

    def __init__(self, examples: list[Example], processor: Processor, images: Images, per_image: int = 1,
                 max_length: int = 0):
        self.examples, self.processor, self.images = examples, processor, images
        images.register(examples)
        self.encoded: list[Encoded] = []
        cache: dict[tuple[str, str], Encoded] = {}
        seen: set[Path] = set()
        for e in examples:
            for path in e.images:
                if path not in seen:  # fail before training starts, not at the first batch that needs it
                    if not path.is_file():
                        what = "is a folder" if path.is_dir() else "does not exist"
                        raise ConfigError(f"{e.where}: image {str(path)!r} {what}")
                    seen.add(path)
            try:  # k images: k leading <image> markers (as the pipeline adds them), k * P image tokens
                key = (marked_prompts([e.image], [e.prefix])[0], e.suffix)
                if key not in cache:
                    cache[key] = processor.encode(*key)
            except InputError as err:
                raise ConfigError(f"{e.where}: {err}") from None
            if len(cache[key].ids) > max_length > 0:
                s = "s" * (len(e.images) > 1)
                raise ConfigError(f"{e.where}: the example is {len(cache[key].ids)} tokens with the image{s}, over "
                                  f"[model] max_length {max_length}: shorten it, or raise max_length (at most "
                                  f"the model's context of {processor.max_length})")
            self.encoded.append(cache[key])
        # Suffix tokens (incl. <eos>) are the loss targets of each example: its share of a batch's token count.
        self.targets = torch.tensor([sum(enc.types) for enc in self.encoded])
        self.lengths = torch.tensor([len(enc.ids) for enc in self.encoded])
        ids: dict[tuple[Path, ...], int] = {}  # (the examples of one list of images are grouped as one image's)
        self.image_ids = torch.tensor([ids.setdefault(e.images, len(ids)) for e in examples])  # [N] image numbers
        self.per_image = per_image  # examples of one image kept together in a batch (see grouped_order)
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, n: int, seed: int, epoch: int) -> torch.Tensor:
        """The epoch order for `global_batch`: image-grouped when `per_image` > 1 (computed once per epoch)."""
        if self.per_image <= 1:
            return epoch_order(n, seed, epoch)
        order = self._orders.get((seed, epoch))
        if order is None:
            order = grouped_order(self.image_ids, self.per_image, seed, epoch)
            self._orders = {(seed, epoch): order}
        return order

    def paths(self, idx: list[int]) -> list[Path]:
        """The distinct images of the examples at `idx`, in order of first use: pixel_values' order in `batch`."""
        return list(dict.fromkeys(p for i in idx for p in self.examples[i].images))

    def batch(self, idx: list[int], aug: AugmentConfig | None = None, seed: int = 0, step: int = 0,
              images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """A padded batch: input_ids, attention_mask, token_type_ids, labels [B, T], and each distinct image once:
        pixel_values [U, 3, S, S] with image_index [N]: the N images of the sequences in order, a sequence's several
        images one after another (the n-th is image_index[n]; N = B when each example has one image).

        With `aug`, each distinct image is jittered by (seed, step, a hash of its path): the same in every process.
        `images`: the uint8 [U, 3, S, S] of `paths(idx)` when already read (the trainer reads them a step ahead).
        """
        paths = {p: k for k, p in enumerate(self.paths(idx))}
        index = torch.tensor([paths[p] for i in idx for p in self.examples[i].images])
        images = self.images.batch(list(paths)) if images is None else images
        if aug is not None and augments(aug):
            images = augment(images, aug, seed, step, [zlib.crc32(str(p).encode()) % 1_000_003 for p in paths])
        out = self.processor.collate([self.encoded[i] for i in idx], self.processor.normalize(images))
        out["image_index"] = index
        return out


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a permutation of range(n), a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def grouped_order(image_ids: torch.Tensor, per_image: int, seed: int, epoch: int) -> torch.Tensor:
    """An epoch order that keeps up to `per_image` examples of one image together (a permutation of range(N)).

    Each image's examples are shuffled and cut into groups of `per_image`; the groups are shuffled. A batch of B
    examples then holds about B / per_image distinct images, and the vision tower runs once per image. A pure
    function of (seed, epoch), like `epoch_order`.
    """
    n = len(image_ids)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    p = torch.randperm(n, generator=g)  # shuffles the examples within each image
    p = p[torch.sort(image_ids[p], stable=True).indices]  # ... then sorts them by image
    img = image_ids[p]
    counts = torch.bincount(img)
    rank = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[img]  # position within its image
    group = img * (int(counts.max()) // per_image + 1) + rank // per_image
    _, group = torch.unique(group, return_inverse=True)
    key = torch.randperm(int(group.max()) + 1, generator=g)[group]  # a random rank per group
    return p[torch.sort(key * n + rank, stable=True).indices]


def global_batch(n: int, batch_size: int, seed: int, step: int, order=epoch_order) -> list[int]:
    """The example indices of optimizer step `step` (0-based): epoch = step // batches_per_epoch.

    `order(n, seed, epoch)` gives an epoch's permutation (`epoch_order`, or a Dataset's image-grouped `order`).
    """
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ConfigError(f"the training data has {n} examples, fewer than one batch of {batch_size}")
    epoch, i = divmod(step, per_epoch)
    return order(n, seed, epoch)[i * batch_size: (i + 1) * batch_size].tolist()


def step_examples(data: Dataset, batch_size: int, seed: int, start: int, stop: int, part: slice) -> list[int]:
    """The examples that `part` of each global batch (a process's share, ddp.shard) takes over steps start..stop-1,
    each once, sorted: what those steps will read (the global batches of `global_batch`, epoch by epoch)."""
    n = len(data)
    per_epoch = n // batch_size
    seen = torch.zeros(n, dtype=torch.bool)
    step = start
    while step < stop and not bool(seen.all()):
        epoch, i = divmod(step, per_epoch)
        j = min(per_epoch, i + stop - step)  # this epoch's batches i..j-1
        batches = data.order(n, seed, epoch)[: per_epoch * batch_size].view(per_epoch, batch_size)
        seen[batches[i:j, part].reshape(-1)] = True
        step += j - i
    return torch.nonzero(seen).flatten().tolist()
