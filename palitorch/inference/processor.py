"""Images and prompts in, tensors out; token ids back to text.

Image: EXIF orientation applied, any PIL mode made RGB (transparency composited onto white), resized straight to
S x S with PIL bicubic, scaled to [0, 1], normalised with the checkpoint's mean/std (0.5 for PaliGemma).
Prompt: `<image> * N + <bos> + prefix + "\\n"` (token type 0), then optionally `suffix + <eos>` (type 1).
Special tokens are looked up by their text in the checkpoint's tokenizer.json, never by id.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Tokenizer

from palitorch.checkpoint.io import read_json_object
from palitorch.errors import CheckpointError, InputError

IMAGE, BOS, EOS, PAD = "<image>", "<bos>", "<eos>", "<pad>"
_LOC_SEG = re.compile(r"<(loc\d{4}|seg\d{3})>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def load_image(image) -> Image.Image:
    """A PIL image from a PIL image, a path, raw bytes, or an array of pixels (`from_array`); EXIF orientation
    applied, converted to RGB."""
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return to_rgb(from_array(image))
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise InputError(f"image file {str(p)!r} {'is not a file' if p.exists() else 'does not exist'}")
        image = _decode(p, f"cannot read image {str(p)!r}")
    elif isinstance(image, (bytes, bytearray)):
        image = _decode(io.BytesIO(image), "cannot decode image bytes")
    elif not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, a path, bytes or an array of pixels, got {type(image).__name__}")
    return to_rgb(_upright(image))


def from_array(a) -> Image.Image:
    """A numpy array or torch tensor of pixels -> a PIL image: [H, W] greyscale, [H, W, C] or [C, H, W] with C of
    1, 3 (RGB) or 4 (RGBA), channels last when both readings fit; uint8 (0-255) or floating point in [0, 1]."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    shape = a.shape
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # channels first, as torchvision keeps them
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
        raise InputError(f"an array image must be [H, W], [H, W, C] or [C, H, W] with C of 1, 3 or 4, got shape "
                         f"{tuple(shape)}")
    if np.issubdtype(a.dtype, np.floating):
        if not (np.isfinite(a).all() and a.min(initial=0) >= 0 and a.max(initial=0) <= 1):
            raise InputError("an array image of floats must hold pixels in [0, 1] (or give uint8, 0-255)")
        a = np.rint(a * 255)
    elif a.dtype != np.uint8 and not (np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255):
        raise InputError(f"an array image must be uint8 (0-255) or floats in [0, 1], got {a.dtype} values outside "
                         "0-255")
    return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)))


def check_image_file(path) -> None:
    """InputError unless Pillow can read the header of image file `path` (format and size; the pixels are not
    decoded): a cheap check of many files before a long job."""
    _decode(path, f"cannot read image {str(path)!r}", header_only=True)


def _decode(source, what: str, header_only: bool = False) -> Image.Image:
    """Open and decode an image file or buffer; InputError `what: why` if Pillow cannot, or if the image is over
    Pillow's pixel limit (a decompression bomb: a small file that decodes to gigabytes)."""
    try:
        with warnings.catch_warnings():  # between half the limit and the limit Pillow warns; the image is fine
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                if not header_only:
                    im.load()
                return im
    except Image.DecompressionBombError:
        raise InputError(f"{what}: it has more pixels than Pillow's safety limit ({Image.MAX_IMAGE_PIXELS:,}): "
                         "resize it first") from None
    except UnidentifiedImageError:  # (Pillow's message names the file again, or a BytesIO object's repr)
        raise InputError(f"{what}: it is not in a format Pillow can read (PNG, JPEG, GIF, WebP, BMP, TIFF, ...)") \
            from None
    except OSError as e:
        raise InputError(f"{what}: {e}") from None


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Damaged EXIF data (which Pillow parses only here, and which
    can raise almost anything) counts as no orientation: the image as stored, without the EXIF block."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 (SyntaxError, struct.error, ValueError, ... from a damaged EXIF block)
        image = image.copy()
        image.info.pop("exif", None)
        return image


def resize_image(image, size: int, resample: int = Image.Resampling.BICUBIC) -> torch.Tensor:
    """An image (as `load_image` takes it) -> uint8 [3, size, size], resized as transformers' processor resizes it
    (PIL; bicubic, or a preprocessor_config.json's `resample`)."""
    img = load_image(image).resize((size, size), resample)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16/32-bit and float greyscale rescaled to 8 bits, alpha composited onto white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        elif img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # mode L
    if img.mode == "La":  # premultiplied grey + alpha, which PIL converts only to LA
        img = img.convert("LA")
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError as e:  # a mode PIL cannot turn into RGB
        raise InputError(f"an image of PIL mode {img.mode!r} cannot be converted to RGB ({e}); save it as an RGB "
                         "PNG or JPEG") from None


# Below this many pixels (read + written, summed over a batch) resizing on threads loses to one thread (the 2-core
# VM of BENCHMARKS.md: 8 images of 64 x 64 px, 0.5 ms on one thread vs 1.3 ms on two; 8 of 256 x 256, 8.3 vs 5.7 ms).
THREADED_RESIZE_MIN_PIXELS = 1 << 18
_pool: ThreadPoolExecutor | None = None


def _resize_pool() -> ThreadPoolExecutor:
    """One pool for the process, made on first use (making a pool per batch costs ~1 ms)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="palitorch-resize")
    return _pool


def _forget_pool() -> None:
    """In a forked child (a DataLoader worker, say): the parent's pool threads do not exist here, make a new one."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pixel_work(images, size: int) -> int:
    """Pixels a batch's resize reads and writes; an image still to be decoded (a path or bytes) counts as large."""
    return sum(im.width * im.height + size * size if isinstance(im, Image.Image) else THREADED_RESIZE_MIN_PIXELS
               for im in images)


@dataclass
class Encoded:
    ids: list[int]
    types: list[int]  # 0 image/bos/prefix/"\n", 1 suffix/eos


def _rescaled(rescale: float) -> torch.Tensor:
    """The 256 uint8 values times `rescale` as transformers computes them: in float64, rounded to float32."""
    return (torch.arange(256, dtype=torch.float64) * rescale).float()


def _exact_divisor(rescale: float | None) -> int | None:
    """n where x / n in float32 gives `_rescaled(rescale)` exactly for every uint8 x (n = 255 for 1/255), else
    None."""
    if not rescale or not math.isfinite(1 / rescale):
        return None
    n = round(1 / rescale)
    ok = n >= 1 and torch.equal(torch.arange(256, dtype=torch.float32) / n, _rescaled(rescale))
    return n if ok else None


def _add_task_tokens(tokenizer: Tokenizer) -> None:
    """Make every <locNNNN> and <segNNN> of the vocabulary one token wherever it is typed (in a prompt, or in a
    detection or segmentation target), as transformers' PaliGemmaProcessor does when it loads a tokenizer. Some Hub
    tokenizer.json files, converted from SentencePiece, hold them in the vocabulary only: their BPE spells the text
    "<loc0100>" in seven byte pieces."""
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    texts = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
    missing = [t for t in texts if t not in added and tokenizer.token_to_id(t) is not None]
    if missing:
        tokenizer.add_tokens(missing)  # plain strings: non-special and normalized, as transformers adds them


class Processor:
    def __init__(self, tokenizer: Tokenizer, image_size: int, num_image_tokens: int,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale: float | None = 1 / 255, max_length: int = 8192,
                 normalize: bool = True, resample: int = Image.Resampling.BICUBIC):
        """`rescale` None, `normalize` False, `resample`: a preprocessor_config.json's do_rescale false, do_normalize
        false and resample (PIL's filter number), as transformers' image processor reads them."""
        self.tokenizer = tokenizer
        _add_task_tokens(tokenizer)
        self.image_size, self.num_image_tokens, self.max_length = image_size, num_image_tokens, max_length
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.rescale, self.do_normalize, self.resample = rescale, normalize, resample
        self._divisor = _exact_divisor(rescale)
        self._rescaled = _rescaled(rescale) if rescale is not None else None  # [256] float32, on the CPU
        self.image_id, self.bos_id = self.token_id(IMAGE), self.token_id(BOS)
        self.eos_id, self.pad_id = self.token_id(EOS), self.token_id(PAD)
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._hidden = {i for i in special if not _LOC_SEG.fullmatch(tokenizer.id_to_token(i) or "")}
        self._hidden |= {self.image_id, self.bos_id, self.eos_id, self.pad_id}
        self._image_prefix = IMAGE * num_image_tokens + BOS
        # The image tokens and <bos> as ids, so that encoding a prompt tokenises its text alone. The tokenizer
        # splits its text at added tokens before anything else, so this gives the ids of the whole string; checked
        # once here on a probe, else every prompt is encoded whole.
        head = [self.image_id] * num_image_tokens + [self.bos_id]
        probe = "a Probe, 12 \n"
        whole = tokenizer.encode(self._image_prefix + probe, add_special_tokens=False).ids
        self._head_ids = head if whole == head + tokenizer.encode(probe, add_special_tokens=False).ids else None

    @classmethod
    def from_folder(cls, path, image_size: int, num_image_tokens: int, max_length: int = 8192) -> Processor:
        """Read tokenizer.json and (if present) preprocessor_config.json from a checkpoint folder."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json: copy the checkpoint's tokenizer files into it")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(
                f"{tok_file} cannot be read by the tokenizers library ({e}); download it again"
            ) from None
        pre = folder / "preprocessor_config.json"
        kw = _preprocessing(pre, image_size, num_image_tokens) if pre.is_file() else {}
        try:
            return cls(tokenizer, image_size, num_image_tokens, max_length=max_length, **kw)
        except InputError as e:
            raise CheckpointError(f"{tok_file}: {e}") from None

    def token_id(self, text: str) -> int:
        i = self.tokenizer.token_to_id(text)
        if i is None:
            raise InputError(f"the tokenizer has no {text} token")
        return i

    def token_bytes(self, token: int) -> bytes:
        """See `token_bytes`."""
        return token_bytes(self.tokenizer, token)

    # ------------------------------------------------------------------ images

    def pixels(self, image) -> torch.Tensor:
        """One image -> float32 [3, S, S]: `resized`, then `normalize`d."""
        return self.normalize(self.resized(image))

    def resized(self, image) -> torch.Tensor:
        """One image -> uint8 [3, S, S] (see `resize_image`)."""
        return resize_image(image, self.image_size, self.resample)

    def resized_batch(self, images) -> torch.Tensor:
        """Images -> uint8 [B, 3, S, S]. A batch with enough work is decoded and resized on threads (PIL releases the
        GIL while it works); small ones run on this thread, where handing out the work would cost more than it."""
        if len(images) == 1 or _pixel_work(images, self.image_size) < THREADED_RESIZE_MIN_PIXELS:
            return torch.stack([self.resized(im) for im in images])
        return torch.stack(list(_resize_pool().map(self.resized, images)))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] -> float32 (x * rescale - mean) / std, on x's device: the operations of transformers'
        processor, so the same values to the bit (it rescales in float64, then works in float32: here a float32
        division that gives the same 256 values, else a table of them; MPS has no float64). A batch moved to an
        accelerator as uint8 is 4x fewer bytes and normalises there; on CPU torch's kernels beat numpy's several-fold.
        The constants go over without making the host wait: asynchronous copies."""
        dev = x.device
        if self.rescale is None:
            x = x.float()
        elif self._divisor is not None and dev.type == "cpu":  # x / 255 in float32 is x * (1/255) in float64,
            x = x.float().div_(self._divisor)  # rounded (CUDA divides by a number as times its reciprocal: not so)
        else:
            x = self._rescaled.to(dev, non_blocking=True)[x.long()]
        if not self.do_normalize:
            return x
        mean = torch.from_numpy(self.mean).to(dev, non_blocking=True).view(3, 1, 1)
        std = torch.from_numpy(self.std).to(dev, non_blocking=True).view(3, 1, 1)
        return x.sub_(mean).div_(std)  # in place: one new buffer, not four

    # ------------------------------------------------------------------ text

    def encode(self, prefix: str, suffix: str | None = None) -> Encoded:
        if not isinstance(prefix, str):
            raise InputError(f"a prompt must be a string, got {type(prefix).__name__}")
        for text in (prefix, suffix or ""):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: bytes that were not UTF-8, decoded with surrogateescape
                raise InputError(f"the text {text[:40]!r} is not valid Unicode (it holds a lone surrogate, e.g. from "
                                 "bytes that were not UTF-8): send UTF-8 text") from None
        if IMAGE in prefix or (suffix is not None and IMAGE in suffix):  # it would count as one more image position
            raise InputError(f"the text contains {IMAGE}, which PaliGemma keeps for the image's own positions "
                             "(the processor puts them in): remove it")
        if self._head_ids is not None:
            ids = self._head_ids + self.tokenizer.encode(prefix + "\n", add_special_tokens=False).ids
        else:
            ids = self.tokenizer.encode(self._image_prefix + prefix + "\n", add_special_tokens=False).ids
        types = [0] * len(ids)
        if suffix is not None:
            s = self.tokenizer.encode(suffix + EOS, add_special_tokens=False).ids
            ids, types = ids + s, types + [1] * len(s)
        if len(ids) > self.max_length:
            raise InputError(
                f"the prompt is {len(ids)} tokens with the image, over the model's context of {self.max_length}; "
                "shorten it"
            )
        return Encoded(ids, types)

    def decode(self, ids, keep_loc_seg: bool = True) -> str:
        """Text of generated ids: special tokens dropped except `<locNNNN>` / `<segNNN>` (task outputs)."""
        ids = [i for i in ids if i not in self._hidden]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ batches

    def collate(self, encoded: list[Encoded], pixels: list[torch.Tensor] | torch.Tensor | None = None,
                padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad a list of encodings to one batch: input_ids, attention_mask, token_type_ids, labels, pixel_values."""
        t = max(len(e.ids) for e in encoded)

        def pad(row: list[int], value: int) -> list[int]:
            fill = [value] * (t - len(row))
            return fill + row if padding_side == "left" else row + fill

        def tensor(rows: list[list[int]]) -> torch.Tensor:  # numpy reads a list of ints ~10x faster than torch
            return torch.from_numpy(np.array(rows, dtype=np.int64))

        ids = tensor([pad(e.ids, self.pad_id) for e in encoded])
        mask = tensor([pad([1] * len(e.ids), 0) for e in encoded])
        types = tensor([pad(e.types, 0) for e in encoded])
        labels = ids.masked_fill(types == 0, -100)
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}
        if pixels is not None:
            out["pixel_values"] = pixels if isinstance(pixels, torch.Tensor) else torch.stack(pixels)
        return out

    def __call__(self, images, prefixes, suffixes=None, padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Lists of images, prefixes and optional suffixes -> a model-ready batch."""
        suffixes = suffixes if suffixes is not None else [None] * len(prefixes)
        enc = [self.encode(p, s) for p, s in zip(prefixes, suffixes)]
        return self.collate(enc, [self.pixels(im) for im in images], padding_side)


def _preprocessing(pre: Path, image_size: int, num_image_tokens: int) -> dict:
    """Processor keywords (mean, std, rescale) from a preprocessor_config.json, checked against config.json and for
    type, so that a damaged file fails here in one line."""
    p = read_json_object(pre)
    size = p.get("size") or {}
    s = size.get("height", size.get("shortest_edge", image_size)) if isinstance(size, dict) else size
    if s != image_size:
        raise CheckpointError(f"{pre} says image size {s!r}, config.json says {image_size}")
    seq = p.get("image_seq_length", num_image_tokens)
    if seq != num_image_tokens:
        raise CheckpointError(f"{pre} says image_seq_length {seq!r}, config.json implies {num_image_tokens}")

    def per_channel(x):  # transformers takes one number for all three channels as well as a list of three
        return [x] * 3 if _numbers([x]) else x

    mean, std = per_channel(p.get("image_mean", 0.5)), per_channel(p.get("image_std", 0.5))
    rescale = p.get("rescale_factor", 1 / 255)
    for key, value, ok, want in (("image_mean", mean, _numbers(mean, 3), "3 numbers"),
                                 ("image_std", std, _numbers(std, 3, positive=True), "3 numbers > 0"),
                                 ("rescale_factor", rescale, _numbers([rescale], positive=True), "a number > 0")):
        if not ok:
            raise CheckpointError(f"{pre}: {key} is {repr(value)[:40]}, it must be {want}; download it again")
    flags = {k: p.get(k, True) for k in ("do_rescale", "do_normalize")}
    resample = p.get("resample", 3)
    for key, value in (*flags.items(), ("resample", resample)):
        if not (isinstance(value, bool) if key != "resample" else type(value) is int and 0 <= value <= 5):
            raise CheckpointError(f"{pre}: {key} is {repr(value)[:40]}, it must be "
                                  f"{'true or false' if key != 'resample' else 'a PIL filter number, 0-5'}")
    return dict(mean=mean, std=std, rescale=rescale if flags["do_rescale"] else None,
                normalize=flags["do_normalize"], resample=resample)


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """What one token adds to the text, as bytes: its piece with sentencepiece's word mark (U+2581) as a space, or
    for a byte-fallback token <0xNN> that byte (a character of several bytes comes as several such tokens); b"" for
    an id the tokenizer does not know. Special tokens give their own text (`<eos>`, `<loc0042>`)."""
    piece = tokenizer.id_to_token(token) or ""
    match = _BYTE_TOKEN.fullmatch(piece)
    return bytes([int(match[1], 16)]) if match else piece.replace("\u2581", " ").encode()


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """`token_bytes` as text; a lone byte of a multi-byte character shows as a \\xNN escape."""
    return token_bytes(tokenizer, token).decode("utf-8", errors="backslashreplace")


def _numbers(values, n: int = 1, positive: bool = False) -> bool:
    """Whether `values` is a list of n finite numbers (each > 0 if `positive`)."""
    return isinstance(values, list) and len(values) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
        for x in values)
