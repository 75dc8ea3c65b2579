"""Checks of what users hand to a `Pipeline` and to `palitorch.load`: a one-line InputError (or CheckpointError)
before any work, rather than an exception from deep inside torch or Pillow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from palitorch.checkpoint.hub import find_checkpoint
from palitorch.errors import InputError
from palitorch.inference.processor import IMAGE, image_markers
from palitorch.inference.sampling import GenerationOptions, _is_int


def as_batch(images, *texts):
    """One input or parallel lists -> (lists, was_single). One image goes with every text, and one text (a string)
    with every image or with every item of the other lists. A generator or other iterator counts as a list."""
    images, *texts = (list(x) if isinstance(x, Iterator) else x for x in (images, *texts))
    lists = [x for x in (images, *texts) if isinstance(x, (list, tuple))]
    if not lists:
        return [images], *[[t] for t in texts], True
    n = len(lists[0])
    if any(len(x) != n for x in lists):
        raise InputError(f"images and prompts must be lists of the same length, got lengths "
                         f"{sorted({len(x) for x in lists})}")
    if n == 0:
        raise InputError("empty batch: give at least one image and prompt")
    return *(list(x) if isinstance(x, (list, tuple)) else [x] * n for x in (images, *texts)), False


def check_images(images: list) -> None:
    """InputError for an empty PIL image (0 pixels wide or high), which cannot be resized. (Arrays of pixels with a
    0 side are refused where they are read; an image file cannot hold no pixels.)"""
    for im in flat_images(images):
        if isinstance(im, Image.Image) and (im.width == 0 or im.height == 0):
            raise InputError(f"an image is {im.width} x {im.height} pixels: it must be at least 1 x 1")


def flat_images(rows: list) -> list:
    """Each input's image(s) -> all the images in order: an input's image is one image, or a list (or tuple) of
    several for its one prompt."""
    return [im for row in rows for im in (row if isinstance(row, (list, tuple)) else [row])]


def marked_prompts(rows: list, prompts: list) -> list:
    """The prompts, each of an input with a list of k images starting with k `<image>` markers (how the processor
    learns how many images a prompt is about, as transformers' does); InputError for an empty list of images, or a
    prompt whose own leading markers count other than its images (a prompt may start with them, as in
    transformers' examples)."""
    out = []
    for row, prompt in zip(rows, prompts):
        k = len(row) if isinstance(row, (list, tuple)) else 1
        if k == 0:
            raise InputError("an input's list of images is empty: give it at least one image")
        if not isinstance(prompt, str):  # (refused where prompts are read: "a prompt must be a string")
            out.append(prompt)
            continue
        marks = image_markers(prompt)
        if marks not in (0, k):
            raise InputError(f"a prompt starts with {marks} {IMAGE} markers for {k} image{'s' * (k > 1)}: give one "
                             "per image, or none")
        out.append(IMAGE * k + prompt if k > 1 and not marks else prompt)
    return out


def check_strings(texts: list, what: str) -> None:
    """InputError unless every item is a string (`what` names them: "an answer to score")."""
    for t in texts:
        if not isinstance(t, str):
            raise InputError(f"{what} must be a string, got {type(t).__name__}")


def check_count(value, name: str) -> int:
    """An integer >= 1 (any integral type; not a bool or a float) as an int, else InputError."""
    if not _is_int(value) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_compile_args(mode, options) -> None:
    """InputError unless `mode` is None or one of torch.compile's modes and `options` is None or a dict of inductor
    settings it knows (by name, "-" or "_"), as `torch.compile` would check them (with its RuntimeError, or the
    list of its hundreds of settings)."""
    from torch._inductor import config, list_mode_options

    modes = list(list_mode_options())
    if mode is not None and mode not in modes:
        raise InputError(f"compile: mode must be None or one of {', '.join(modes)}; got {mode!r}")
    if options is None:
        return
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise InputError(f"compile: options must be a dict of inductor settings by name (e.g. "
                         f"{{'coordinate_descent_tuning': True}}), got {type(options).__name__}")
    known = config.get_config_copy()
    unknown = [k for k in options if k.replace("-", "_") not in known]
    if unknown:
        raise InputError(f"compile: {unknown[0]!r} is not an inductor setting (torch._inductor.config has the list)")


def check_quantize(quantize) -> str | None:
    """`quantize` as load takes it: None, or the name of a scheme of palitorch.model.quant ("int8"); else InputError."""
    from palitorch.model.quant import SCHEMES

    if quantize is None or (isinstance(quantize, str) and quantize.lower() in SCHEMES):
        return quantize if quantize is None else quantize.lower()
    raise InputError(f"quantize must be None or {', '.join(map(repr, SCHEMES))}, not {quantize!r}")


def chunks(n: int, batch_size) -> list[slice]:
    """The slices of `n` inputs to run as batches: all at once when `batch_size` is None, else that many at a time."""
    size = n if batch_size is None else check_count(batch_size, "batch_size")
    return [slice(i, i + size) for i in range(0, n, size)]


def resolve_device(device) -> torch.device:
    """A device to load onto ("cpu", "cuda", "cuda:N", "mps", a torch.device or a CUDA index) that exists on this
    machine, else a one-line InputError: said before any file is read."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)) and not _is_int(device):
        raise InputError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1' (or a torch.device), got "
                         f"{type(device).__name__}")
    try:
        d = device if isinstance(device, torch.device) else torch.device(
            device if isinstance(device, str) else f"cuda:{int(device)}")
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps' (in lower case)") from None
    if d.type == "meta":
        raise InputError("device 'meta' holds no data, so a model there cannot run: use 'cpu' or 'cuda'")
    if d.type == "cpu":
        return d
    if d.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("device 'mps' (Apple GPU) is not available on this machine: use device='cpu'")
        return d
    backend = getattr(torch, d.type, None)
    if backend is None or not hasattr(backend, "is_available"):
        raise InputError(f"device {str(d)!r} is not supported: use 'cpu', 'cuda' or 'mps'")
    if not backend.is_available():
        why = "this torch was built without it" if d.type == "cuda" and torch.version.cuda is None and \
            torch.version.hip is None else "no such device is visible"
        raise InputError(f"device {str(d)!r} is not available on this machine ({why}): use device='cpu'")
    count = backend.device_count()
    if d.index is not None and d.index >= count:
        raise InputError(f"device {str(d)!r} does not exist: this machine has {count} {d.type} device"
                         f"{'s' if count != 1 else ''} ({d.type}:0{f' to {d.type}:{count - 1}' if count > 1 else ''})")
    return d


def checkpoint_path(path, revision: str | None = None, what: str = "path") -> Path:
    """The folder `palitorch.load` reads: the path, "~" expanded, or for a Hub id ("google/paligemma2-3b-pt-224")
    that is no folder here, its snapshot in the local Hugging Face cache at `revision` (default "main"); one that the
    cache lacks is a CheckpointError saying how to download it (palitorch does not). `what` names the argument in
    errors ("adapter": a LoRA adapter's folder)."""
    folder = "a LoRA adapter folder" if what == "adapter" else "a checkpoint folder"
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{what} must be {folder} (a str or Path), got {type(path).__name__}")
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise InputError(f"{what} is empty: give {folder}" + (" (or no path, for the bundled model)"
                                                              if what == "path" else ""))
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise InputError(f"revision must be a branch, tag or commit of the Hub id (a non-empty str), got {revision!r}")
    return find_checkpoint(text, revision)


def model_paths(path=None, revision: str | None = None, adapter=None) -> tuple[Path, Path | None]:
    """(the checkpoint folder, the adapter folder or None) that `palitorch.load(path, adapter=, revision=)` reads,
    by `checkpoint_path`; with no `path`, the base model that the adapter names (as peft's AutoPeftModel loads it),
    else the bundled model."""
    from palitorch.assets import default_model_path
    from palitorch.checkpoint.adapter import adapter_base

    folder = checkpoint_path(path, revision) if path is not None else None
    adapter = checkpoint_path(adapter, what="adapter") if adapter is not None else None
    if folder is None and adapter is not None and revision is None:
        folder = adapter_base(adapter)
    return folder or checkpoint_path(default_model_path(), revision), adapter


def admit_inputs(default: GenerationOptions, images, prompts, tags, streams, options) -> list[GenerationOptions]:
    """`LiveBatch.admit`'s inputs: InputError for lists that do not pair up or options that a live batch cannot
    decode with, before any row is written -> each sequence's options (`default` where none are given), checked."""
    odd = [p for p in prompts if not isinstance(p, str)] if isinstance(prompts, (list, tuple)) else [prompts]
    if odd:
        got = type(prompts).__name__ + (f" holding {type(odd[0]).__name__}" if odd[0] is not prompts else "")
        raise InputError(f"admit takes a list of prompt strings, got {got}")
    if not isinstance(images, (list, tuple)):
        raise InputError(f"admit takes a list of images (one per prompt), got {type(images).__name__}")
    n = len(prompts)
    for name, given in (("images", images), ("tags", tags), ("streams", streams), ("options", options)):
        if given is not None and (not isinstance(given, (list, tuple)) or len(given) != n):
            what = f"{len(given)} {name}" if isinstance(given, (list, tuple)) else \
                f"{name} as {type(given).__name__}"
            raise InputError(f"admit takes one of each per prompt: {n} prompts and {what}")
    if options is None:
        return [default] * n
    checked = []
    for o in options:
        if not isinstance(o, (GenerationOptions, dict)):
            raise InputError(f"admit's options are GenerationOptions or dicts of decoding keywords, got "
                             f"{type(o).__name__}")
        o = GenerationOptions.from_kwargs(default, **{str(k): v for k, v in o.items()}) \
            if isinstance(o, dict) else GenerationOptions.from_kwargs(o)
        check_live_options(o)
        checked.append(o)
    return checked

def check_live_options(o: GenerationOptions) -> None:
    """InputError for options a live batch cannot decode with (beams; a seeded sample)."""
    if o.num_beams > 1:
        raise InputError("a live batch decodes one sequence per row: use num_beams=1 (or generate for beams)")
    if o.do_sample and o.seed is not None:
        raise InputError("a seeded sample depends on its batch: generate it alone, or sample without a seed")
