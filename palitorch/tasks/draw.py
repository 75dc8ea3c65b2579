"""Draw detected boxes (and optionally segmentation masks) with their labels onto an image."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from palitorch.errors import InputError
from palitorch.inference.images import load_image

# Colours far apart in hue and easy to read on photos; labels take them in order of first appearance.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
]
MASK_ALPHA = 0.45


def label_colours(labels: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A distinct colour per label, stable for a given order of labels."""
    colours: dict[str, tuple[int, int, int]] = {}
    for label in labels:
        if label not in colours:
            colours[label] = PALETTE[len(colours) % len(PALETTE)]
    return colours


def _text_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def draw_detections(image, detections, masks: Sequence[np.ndarray | None] | None = None) -> Image.Image:
    """A copy of `image` (RGB, upright by its EXIF orientation as the model saw it; a PIL image, path, bytes or
    array) with each detection's box and label drawn; `masks` (one bool [H, W] array or None
    per detection, e.g. from segmentation.decode_mask) are blended in the label's colour.

    `detections` are any objects with `.label` and `.box = (x0, y0, x1, y1)` in pixels: Detection or Segmentation
    (a list, or any iterable). InputError for other objects, or masks that are not one [H, W] array (or None) per
    detection.
    """
    detections = list(detections)  # a generator would be used up by the colours, leaving nothing to draw
    for d in detections:
        if not (hasattr(d, "label") and hasattr(d, "box")):
            raise InputError(f"draw_detections draws objects with .label and .box (Detection, Segmentation), got "
                             f"{type(d).__name__}")
        box = list(d.box) if isinstance(d.box, (tuple, list, np.ndarray)) else []
        if len(box) != 4 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in box):
            raise InputError(f"draw_detections: a box is (x0, y0, x1, y1), four finite numbers of pixels, got "
                             f"{d.box!r}")
    out = load_image(image).copy()
    w, h = out.size
    colours = label_colours([d.label for d in detections])
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(detections):
            raise InputError(f"draw_detections: {len(masks)} masks for {len(detections)} detections: give one per "
                             "detection (None where there is none)")
        pixels = np.asarray(out, dtype=np.float32)
        for i, (d, m) in enumerate(zip(detections, masks)):
            if m is not None:
                m = np.asarray(m, dtype=bool)
                if m.shape != (h, w):
                    raise InputError(f"draw_detections: mask {i} has shape {m.shape}, the image is {h} x {w}: give "
                                     "bool [height, width] masks (decode_mask's image_size is (width, height))")
                pixels[m] = (1 - MASK_ALPHA) * pixels[m] + MASK_ALPHA * np.asarray(colours[d.label], np.float32)
        out = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))

    side = min(w, h)
    line = max(1, round(side / 200))
    font = ImageFont.load_default(size=max(10, round(side / 35)))
    draw = ImageDraw.Draw(out)
    for d in detections:
        colour = colours[d.label]
        x0, y0, x1, y1 = d.box  # x1, y1: the edge past the object; PIL's rectangle includes its last row and column
        (x0, x1), (y0, y1) = sorted((x0, x1)), sorted((y0, y1))  # (a box made by hand may give its corners reversed)
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour, width=line)
        if not d.label:
            continue
        # The label sits on a filled tab above the box, or just inside it when the box touches the top edge.
        left, top, right, bottom = draw.textbbox((0, 0), d.label, font=font)
        tw, th, pad = right - left, bottom - top, max(1, line)
        ty = y0 - th - 2 * pad if y0 - th - 2 * pad >= 0 else y0
        tx = min(max(x0, 0), max(w - tw - 2 * pad, 0))
        draw.rectangle((tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad), fill=colour)
        draw.text((tx + pad - left, ty + pad - top), d.label, fill=_text_colour(colour), font=font)
    return out
