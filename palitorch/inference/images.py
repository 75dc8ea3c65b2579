"""One image in, an RGB PIL image (or the model's resized pixels) out: from a PIL image, a file, bytes or an array.

EXIF orientation is applied (a photo is upright, as its viewer shows it), and any PIL mode is made RGB: 16/32-bit
and float greyscale rescaled to 8 bits, transparency composited onto white. Errors are one-line InputErrors that
say what was wrong with the image (a missing file, a format Pillow cannot read, a decompression bomb).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from palitorch.errors import InputError


def load_image(image) -> Image.Image:
    """A PIL image from a PIL image, a path, raw bytes, or an array of pixels (`from_array`); EXIF orientation
    applied, converted to RGB."""
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return to_rgb(from_array(image))
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            text = os.fspath(image)
            if isinstance(text, str) and text.lower().startswith(("http://", "https://")) and not p.exists():
                raise InputError(f"{text!r} is a URL: palitorch reads image files (download it first, e.g. with "
                                 "curl -O, and give its path)")
            if isinstance(text, str) and not text.strip():
                raise InputError("the image path is empty: give an image file")
            raise InputError(f"image file {str(p)!r} {'is not a file' if p.exists() else 'does not exist'}")
        image = _decode(p, f"cannot read image {str(p)!r}")
    elif isinstance(image, (bytes, bytearray)):
        image = _decode(io.BytesIO(image), "cannot decode image bytes")
    elif not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, a path, bytes or an array of pixels, got {type(image).__name__}")
    else:
        _load_pixels(image)
    return to_rgb(_upright(image))


def _load_pixels(image: Image.Image) -> None:
    """Decode a PIL image's pixels now, if `Image.open` left them in its file (as it does until they are used):
    InputError if the file is truncated or damaged, or the image was closed, rather than Pillow's error from deep
    inside the resize."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except (ValueError, AssertionError) as e:  # Pillow 13, closed: ValueError, or an AssertionError if still unread
        raise InputError(f"cannot read the PIL image's pixels ({str(e) or 'its file is closed'}): if its `with "
                         "Image.open(...)` block has ended, call .load() inside it, or give the file's path") from None
    except OSError as e:  # a truncated or damaged file, read only now
        raise InputError(f"cannot read the PIL image's pixels: {e}") from None


def from_array(a) -> Image.Image:
    """A numpy array or torch tensor of pixels -> a PIL image: [H, W] greyscale, [H, W, C] or [C, H, W] with C of
    1, 3 (RGB) or 4 (RGBA), channels last when both readings fit; uint8 (0-255), uint16 (0-65535, scaled to 8
    bits as a 16-bit image file is, unless every value is <= 255: 8-bit values in a wider type, as other integer
    types may hold them) or floating point in [0, 1]."""
    if isinstance(a, torch.Tensor):
        a = _tensor_to_numpy(a)
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
    elif a.dtype.kind == "u" and a.dtype.itemsize == 2 and a.max() > 255:  # 16-bit pixels (a 16-bit PNG's, a camera's)
        a = np.rint(a / 257.0)  # 0..65535 -> 0..255, as `to_rgb` scales a 16-bit file (values all <= 255: 8-bit ones)
    elif a.dtype != np.uint8 and not (np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255):
        what = "values outside 0-255" if np.issubdtype(a.dtype, np.integer) else "pixels"  # (bool, complex, object)
        raise InputError(f"an array image must be uint8 (0-255), uint16 (0-65535) or floats in [0, 1], got {a.dtype} "
                         f"{what}")
    return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)))


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor of pixels -> a numpy array of the same values. Floats that numpy lacks (bfloat16, float8) are widened
    to float32 (exactly); a tensor with no data (meta) or of another layout (sparse) is an InputError."""
    if t.layout != torch.strided:
        raise InputError(f"an image tensor must be dense (torch.strided), got layout {t.layout}: call .to_dense()")
    if t.device.type == "meta":
        raise InputError("an image tensor on the meta device holds no pixels")
    t = t.detach()
    if t.dtype.is_floating_point and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()  # bfloat16 and float8 values are all float32 values
    try:
        return t.cpu().numpy()
    except TypeError:  # a dtype numpy has no type for (quantized, bits)
        raise InputError(f"an array image must be uint8 (0-255), uint16 (0-65535) or floats in [0, 1], got "
                         f"{str(t.dtype).removeprefix('torch.')}") from None


def check_image_file(path) -> None:
    """InputError unless Pillow can read the header of image file `path` (format and size; the pixels are not
    decoded): a cheap check of many files before a long job."""
    _decode(path, f"cannot read image {str(path)!r}", header_only=True)


def upright_size(path) -> tuple[int, int]:
    """(width, height) of image file `path` as `load_image` gives it (turned by its EXIF orientation), from its header
    alone. InputError as `load_image`."""
    image = _decode(path, f"cannot read image {str(path)!r}", header_only=True)
    try:
        turned = image.getexif().get(0x0112) in (5, 6, 7, 8)  # (the orientations that swap width and height)
    except Exception:  # noqa: BLE001 (damaged EXIF data: no orientation, as in _upright)
        turned = False
    return (image.height, image.width) if turned else image.size


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
    can raise almost anything) counts as no orientation: the image as stored, without the EXIF block. (A JPEG file
    opened by Pillow tolerates its damaged block, but a copy of it, such as the result, parses the block again.)"""
    try:
        out = ImageOps.exif_transpose(image)
        if "exif" in out.info:
            Image.Exif().load(out.info["exif"])  # parsed as the result's own getexif() would
        return out
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
