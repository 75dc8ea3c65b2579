"""Segmentation output: `<loc>` x 4, `<seg>` x 16, label -> box, codes and (given the VQ-VAE's weights) a mask.

PaliGemma answers `segment cat` with `<locY0><locX0><locY1><locX1><segA>...<segP> cat`, objects joined by ` ; `.
The 16 codes index the 128-entry codebook of a small VQ-VAE trained by big_vision on Open Images masks
(`vae-oid.npz`, not shipped with palitorch: pass its path). Its decoder turns the 4 x 4 grid of code vectors into
a 64 x 64 mask logit map in [-1, 1], which is resized into the box and thresholded at 0.

Decoder (PyTorch names as stored in vae-oid.npz; axes N batch, C channels, H W spatial):
    _vq_vae._embedding        [128, D]          codebook; 16 codes -> [N, D, 4, 4] (row-major over the 4 x 4 grid)
    decoder.0                 1x1 conv D->128, ReLU
    decoder.2.net, .3.net     residual blocks: 3x3 conv, ReLU, 3x3 conv, ReLU, 1x1 conv, + input
    decoder.4/.6/.8/.10       4x4 stride-2 transposed convs 128->128->64->32->16, each with ReLU: 4 -> 64 px
    decoder.12                1x1 conv 16->1
The decoder follows big_vision's description and its published conversion. On weights of the real shapes it gives
the logits of big_vision's own JAX decoder (tests/tasks/data/make_vae_golden.py; within 1e-6 of the largest); it
has not been run on the real vae-oid.npz here.
"""

from __future__ import annotations

import math
import numbers
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from palitorch.errors import InputError
from palitorch.tasks.detection import NUM_SEG_CODES, check_answer, image_size, locs_to_box, split_objects

CODEBOOK_SIZE = 128
MASK_SIZE = 64  # the decoder's output side: the 4 x 4 code grid, doubled by each of the 4 upsampling convs
_RES_BLOCKS = ("decoder.2.net", "decoder.3.net")
_UPSAMPLE = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")


@dataclass(frozen=True)
class Segmentation:
    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the original image's pixels
    codes: tuple[int, ...] | None  # 16 VQ-VAE codebook indices, 0..127; None for a box without them

    def to_dict(self) -> dict:
        return {"label": self.label, "box": [round(v, 2) for v in self.box],
                "codes": None if self.codes is None else list(self.codes)}


def parse_segmentations(text: str, width, height=None) -> list[Segmentation]:
    """Every object of a segmentation answer (four locations, 16 codes, a label), boxes in pixels as
    `parse_detections` gives them. An object whose codes are not 16 in 0..127 (a bare box, or an answer cut short)
    keeps its box with `codes` None. InputError if `text` is not a string (give `Result.text`) or a side is not
    > 0."""
    width, height = image_size(width, height)
    check_answer(text, width, height, "parse_segmentations")
    out = []
    for locs, codes, label in split_objects(text):
        whole = len(codes) == NUM_SEG_CODES and all(c < CODEBOOK_SIZE for c in codes)
        out.append(Segmentation(label, locs_to_box(locs, width, height), codes if whole else None))
    return out


# ---------------------------------------------------------------------------------------------- VQ-VAE decoder


def vae_shapes(embed_dim: int) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder needs and its shape (conv weights [out, in, kh, kw], transposed [in, out, kh, kw])."""
    shapes = {"_vq_vae._embedding": (CODEBOOK_SIZE, embed_dim),
              "decoder.0.weight": (128, embed_dim, 1, 1), "decoder.0.bias": (128,),
              "decoder.12.weight": (1, 16, 1, 1), "decoder.12.bias": (1,)}
    for block in _RES_BLOCKS:
        for i, k in ((0, 3), (2, 3), (4, 1)):
            shapes[f"{block}.{i}.weight"], shapes[f"{block}.{i}.bias"] = (128, 128, k, k), (128,)
    for name, (cin, cout) in zip(_UPSAMPLE, ((128, 128), (128, 64), (64, 32), (32, 16))):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cin, cout, 4, 4), (cout,)
    return shapes


def load_vae_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read big_vision's `vae-oid.npz` (plain arrays only: pickled objects are refused) and check every shape."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"VQ-VAE weights: {str(p)!r} is a folder; give the file itself, big_vision's vae-oid.npz")
    if p.exists() and not p.is_file():  # (a device or a pipe: numpy and zipfile read only files they can seek in)
        raise InputError(f"VQ-VAE weights: {str(p)!r} is not a regular file; give big_vision's vae-oid.npz")
    if not p.is_file():
        raise InputError(f"VQ-VAE weights {str(p)!r} do not exist (big_vision's vae-oid.npz is needed for masks)")
    if not zipfile.is_zipfile(p):  # else numpy takes any other file for a pickle and says how to unpickle it
        raise InputError(f"VQ-VAE weights {str(p)!r} are not an .npz file: give big_vision's vae-oid.npz")
    try:
        with np.load(p, allow_pickle=False) as f:
            params = {k: np.asarray(f[k]) for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        why = "it holds pickled objects, which palitorch never loads" if "pickle" in str(e) else str(e)
        raise InputError(f"cannot read VQ-VAE weights {str(p)!r} as a plain .npz: {why}") from None
    check_vae_params(params, source=str(p))
    return params


def check_vae_params(params: dict, source: str = "VQ-VAE weights") -> None:
    emb = params.get("_vq_vae._embedding")
    if emb is None or np.ndim(emb) != 2:
        raise InputError(f"{source}: no 2-D '_vq_vae._embedding' codebook")
    for name, shape in vae_shapes(emb.shape[1]).items():
        if name not in params:
            raise InputError(f"{source}: missing tensor {name!r}")
        if tuple(np.shape(params[name])) != shape:
            raise InputError(f"{source}: {name!r} has shape {tuple(np.shape(params[name]))}, expected {shape}")


def check_codes(codes, what: str, shapes: str, one: bool) -> np.ndarray:
    """`codes` as int64 [N, 16]: InputError unless they are whole numbers in 0..127 shaped [16] (or, unless `one`,
    [N, 16]). Else a mask decoded from codes cut short, or the first of several objects' codes, or codes 1.5 read
    as 1, would come back without a word (or a reshape error would)."""
    arr = np.asarray(codes)
    shape_ok = arr.ndim == 1 or (arr.ndim == 2 and not one)
    if not shape_ok or arr.shape[-1] != NUM_SEG_CODES:
        raise InputError(f"{what} takes {NUM_SEG_CODES} segmentation codes per object ({shapes}), got shape "
                         f"{arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what}: segmentation codes are whole numbers (codebook indices), got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= CODEBOOK_SIZE):
        raise InputError(f"segmentation codes must be in 0..{CODEBOOK_SIZE - 1}")
    return arr.astype(np.int64).reshape(-1, NUM_SEG_CODES)


@torch.inference_mode()
def decode_codes(codes, vae_params: dict) -> torch.Tensor:
    """Codes [N, 16] (or [16]) -> mask logits float32 [N, MASK_SIZE, MASK_SIZE] (64 x 64), roughly in [-1, 1]
    (positive = inside)."""
    check_vae_params(vae_params)
    idx = torch.as_tensor(check_codes(codes, "decode_codes", shapes="[N, 16] or [16]", one=False))
    w = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in vae_params.items()}
    x = w["_vq_vae._embedding"][idx]  # [N, 16, D]
    x = x.reshape(-1, 4, 4, x.shape[-1]).permute(0, 3, 1, 2)  # [N, D, 4, 4]: code k sits at row k // 4, col k % 4

    def conv(x, name, padding=0):
        return F.conv2d(x, w[f"{name}.weight"], w[f"{name}.bias"], padding=padding)

    x = F.relu(conv(x, "decoder.0"))
    for b in _RES_BLOCKS:
        h = F.relu(conv(x, f"{b}.0", padding=1))
        h = F.relu(conv(h, f"{b}.2", padding=1))
        x = x + conv(h, f"{b}.4")
    for name in _UPSAMPLE:
        # big_vision's flax ConvTranspose(kernel 4, stride 2, padding 2, transpose_kernel=True) is PyTorch's
        # conv_transpose2d with padding 4 - 1 - 2 = 1: each one doubles the side.
        x = F.relu(F.conv_transpose2d(x, w[f"{name}.weight"], w[f"{name}.bias"], stride=2, padding=1))
    return conv(x, "decoder.12")[:, 0]  # [N, MASK_SIZE, MASK_SIZE]


def decode_mask(codes, box, vae_params: dict, image_size: tuple[int, int]) -> np.ndarray:
    """One object's mask: bool [height, width] for an image of `image_size = (width, height)`, True inside.

    The 64 x 64 logits are resized (bilinear) onto the box, rounded to whole pixels, and thresholded at 0;
    everything outside the box is False. `vae_params` comes from load_vae_params.
    """
    if codes is None:
        raise InputError("this object has no mask codes (a bare box: Segmentation.codes is None): draw its box only")
    check_codes(codes, "decode_mask", shapes="one object's [16]", one=True)
    sides = list(image_size) if isinstance(image_size, (tuple, list)) else []
    if len(sides) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                                  and v >= 1 and v == int(v) for v in sides):
        raise InputError(f"decode_mask: image_size is (width, height) in whole pixels >= 1, got {image_size!r}")
    width, height = (int(v) for v in sides)
    corners = list(box) if isinstance(box, (tuple, list, np.ndarray)) else []
    if len(corners) != 4 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in corners):
        raise InputError(f"decode_mask: box is (x0, y0, x1, y1), four finite numbers of pixels, got {box!r}")
    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = (round(float(v)) for v in corners)
    x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
    y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
    if x1 <= x0 or y1 <= y0:
        return mask
    logits = decode_codes(codes, vae_params)[0].numpy()
    logit_image = Image.fromarray(np.ascontiguousarray(logits, dtype=np.float32))  # mode "F"
    resized = logit_image.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    mask[y0:y1, x0:x1] = np.asarray(resized) > 0
    return mask


def mask_overlap(prediction: str, target: str, vae_params: dict, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """(intersection, union) in pixels of the masks of the first object of a predicted and a target segmentation
    answer, in an image of `image_size` = (width, height) (RefCOCO's mask IoU: their ratio; summed over examples,
    the overall IoU); None when the target is no segmentation (no 16 codes). A prediction without a whole object
    has an empty mask."""
    width, height = image_size
    want = parse_segmentations(target, width, height)
    if not want or want[0].codes is None:
        return None
    truth = decode_mask(want[0].codes, want[0].box, vae_params, image_size)
    got = parse_segmentations(prediction, width, height) if isinstance(prediction, str) else []
    guess = decode_mask(got[0].codes, got[0].box, vae_params, image_size) if got and got[0].codes is not None \
        else np.zeros_like(truth)
    return int((truth & guess).sum()), int((truth | guess).sum())
