"""Images and prompts in, tensors out; token ids back to text.

Image (loaded as images.py says: EXIF orientation applied, any PIL mode made RGB), resized straight to
S x S (PIL bicubic, PaliGemma's, unless preprocessor_config.json names another filter), scaled to [0, 1] and
normalised with the checkpoint's mean/std (0.5 for PaliGemma), each step as its do_rescale / do_normalize say.
Prompt: `<image> * N + <bos> + prefix + "\\n"` (token type 0), then optionally `suffix + <eos>` (type 1); with k
images (a prompt that starts with k `<image>` markers), `<image> * k N`, each image's tokens one after another.
Special tokens are looked up by their text in the checkpoint's tokenizer.json, never by id.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer

from palitorch.checkpoint.io import read_json_object
from palitorch.errors import CheckpointError, InputError
from palitorch.inference.images import resize_image

IMAGE, BOS, EOS, PAD, UNK = "<image>", "<bos>", "<eos>", "<pad>", "<unk>"
MAX_IMAGES = 16  # images for one prompt that run, batch, serve and training data take (video transfers: 16 frames)
_LOC_SEG = re.compile(r"<(loc\d{4}|seg\d{3})>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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
    images: int = 1  # the images it is about (its ids start with images * num_image_tokens <image> ids)


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
    "<loc0100>" in seven byte pieces. Likewise <image>, <bos>, <eos>, <pad> and <unk>, which transformers adds as
    special tokens when a tokenizer.json lists them in its vocabulary only (PaliGemmaProcessor adds <image>, the
    tokenizer the special tokens tokenizer_config.json names): else the text "<eos>" that ends every suffix, and the
    "<image>" and "<bos>" of a prompt encoded whole, were spelled in pieces."""
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}

    def missing(texts):
        return [t for t in texts if t not in added and tokenizer.token_to_id(t) is not None]

    specials = missing((PAD, EOS, BOS, UNK, IMAGE))
    if specials:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tasks = missing([f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)])
    if tasks:
        tokenizer.add_tokens(tasks)  # plain strings: non-special and normalized, as transformers adds them


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
        # once here on probes, else every prompt is encoded whole. One starts with a letter (a Metaspace that marks
        # only the text's first word), one with a space (an <image> or <bos> with rstrip, which eats the spaces
        # after it in the whole string).
        head = [self.image_id] * num_image_tokens + [self.bos_id]

        def same(probe: str) -> bool:
            whole = tokenizer.encode(self._image_prefix + probe, add_special_tokens=False).ids
            return whole == head + tokenizer.encode(probe, add_special_tokens=False).ids

        self._head_ids = head if same("a Probe, 12 \n") and same(" a\tprobe \n") else None

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

    def is_hidden(self, token: int) -> bool:
        """Whether `decode` leaves a token out of the text (a special token other than <locNNNN> / <segNNN>)."""
        return token in self._hidden

    def is_byte(self, token: int) -> bool:
        """Whether a token is a byte-fallback token <0xNN> (one byte of a character the vocabulary lacks)."""
        return _BYTE_TOKEN.fullmatch(self.tokenizer.id_to_token(token) or "") is not None

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
        # transformers' "<image>caption en"; k markers: k images ("<image><image>answer en ...", as its processor)
        marks = image_markers(prefix)
        images, prefix = max(1, marks), prefix[len(IMAGE) * marks:]
        if IMAGE in prefix or (suffix is not None and IMAGE in suffix):  # it would count as one more image position
            raise InputError(f"the text contains {IMAGE}, which PaliGemma keeps for the image's own positions "
                             "(the processor puts them in): remove it")
        if self._head_ids is not None:
            head = self._head_ids if images == 1 else self._head_ids[:-1] * images + self._head_ids[-1:]
            ids = head + self.tokenizer.encode(prefix + "\n", add_special_tokens=False).ids
        else:
            head = self._image_prefix if images == 1 else IMAGE * self.num_image_tokens * images + BOS
            ids = self.tokenizer.encode(head + prefix + "\n", add_special_tokens=False).ids
        types = [0] * len(ids)
        if suffix is not None:
            s = self.suffix_ids(suffix)
            if len(ids) <= self.max_length < len(ids) + len(s):  # the answer is what does not fit
                raise InputError(f"the prompt ({len(ids)} tokens with {image_words(images, self.num_image_tokens)}) "
                                 f"and its answer ({len(s)} tokens, <eos> included) are {len(ids) + len(s)} tokens, "
                                 f"over the model's context of {self.max_length}: shorten the answer")
            ids, types = ids + s, types + [1] * len(s)
        if len(ids) > self.max_length:
            raise InputError(
                f"the prompt is {len(ids)} tokens with {image_words(images, self.num_image_tokens)}, over the "
                f"model's context of {self.max_length}; shorten it{' or give fewer images' * (images > 1)}"
            )
        return Encoded(ids, types, images)

    def suffix_ids(self, suffix: str) -> list[int]:
        """An answer's token ids, `<eos>` included: tokenized apart from the prompt, as transformers' processor
        tokenizes a suffix (its `text_pair`)."""
        return self.tokenizer.encode(suffix + EOS, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of generated ids: special tokens dropped, `<locNNNN>` / `<segNNN>` (task outputs) always kept."""
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
    """Processor keywords (mean, std, rescale, normalize, resample) from a preprocessor_config.json, checked against
    config.json and for type, so that a damaged file fails here in one line."""
    p = read_json_object(pre)
    size = p.get("size") or {}
    s = size.get("height", size.get("shortest_edge", image_size)) if isinstance(size, dict) else size
    if s != image_size:
        raise CheckpointError(f"{pre} says image size {s!r}, config.json says {image_size}")
    if isinstance(size, dict) and size.get("width", s) != s or p.get("do_resize", True) is not True:
        raise CheckpointError(f"{pre}: PaliGemma's images are resized to {image_size} x {image_size}, this file says "
                              f"size {size!r}, do_resize {p.get('do_resize', True)!r}; download it again")
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
    flags = {k: bool(v) if v is None else v for k, v in flags.items()}  # (null: off, as transformers reads it)
    resample = p.get("resample", 3)
    for key, value in (*flags.items(), ("resample", resample)):
        if not (isinstance(value, bool) if key != "resample" else type(value) is int and 0 <= value <= 5):
            raise CheckpointError(f"{pre}: {key} is {repr(value)[:40]}, it must be "
                                  f"{'true or false' if key != 'resample' else 'a PIL filter number, 0-5'}")
    return dict(mean=mean, std=std, rescale=rescale if flags["do_rescale"] else None,
                normalize=flags["do_normalize"], resample=resample)


def image_words(k: int, tokens: int) -> str:
    """How an error names a prompt's images: "the image", or "its 3 images (256 tokens each)"."""
    return "the image" if k <= 1 else f"its {k} images ({tokens} tokens each)"


def image_markers(prompt: str) -> int:
    """How many `<image>` markers a prompt starts with: the number of images it is about (0: one)."""
    n = 0
    while prompt.startswith(IMAGE, n * len(IMAGE)):
        n += 1
    return n


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
