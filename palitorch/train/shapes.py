"""easy-VQA-style images: draw one coloured shape on a near-flat background, and measure it back from the pixels.

An easy-VQA image is 64x64 RGB: a background with every channel in 230..255, and one circle, rectangle or
(equilateral, apex-up) triangle filled with one of 8 pure colours, 8 to 32 px across. The package drew each shape
at twice the size without anti-aliasing and halved the image with a bilinear filter, so edges are one pixel of
blend between the two colours. `draw` does the same; `measure` inverts it:

- background: the most common colour on the image border (a shape may cover a corner, never most of the border);
- coverage of each pixel: its colour's position on the segment background -> shape colour (0..1); shape pixels are
  those at least half covered, and the box is their tight bounding box;
- colour: the palette colour nearest the most common colour among clearly non-background pixels (the shape's
  flat interior);
- shape: each of the three ideal shapes is fitted to the coverage by its moments (same area and centroid; a
  rectangle also takes its aspect ratio from the variances) and the one with the least |ideal - measured|
  coverage wins. A fill ratio (pixels / box area) also separates them, but not for the smallest shapes, whose
  box edges anti-aliasing moves by a pixel; the moment fit does not depend on the box. On the 5,000 package images
  the winner's error is <= 0.14 of the shape's area and the runner-up's is >= 0.075 of the area worse.

Boxes are in pixel-edge coordinates (x0, y0, x1, y1): a box covering pixel columns c0..c1 inclusive has x0 = c0 and
x1 = c1 + 1, so a full-image box is (0, 0, W, H). `loc_tokens` puts them on PaliGemma's 0..1023 grid as
loc = round(y / H * 1023), the inverse of big_vision's decoding y = loc / 1023 * H (within H / 2046 px) that
`palitorch.tasks.parse_detections` uses.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "rectangle", "triangle")
COLORS = {  # the 8 fill colours of easy-VQA, as found in its images' flat interiors
    "black": (0, 0, 0), "gray": (128, 128, 128), "red": (255, 0, 0), "green": (0, 255, 0),
    "blue": (0, 0, 255), "yellow": (255, 255, 0), "teal": (0, 128, 128), "brown": (165, 42, 42),
}
NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in NAMES])  # 8 3
SIZE = 64  # image side, px
SCALE = 2  # drawn at SIZE * SCALE, then halved with a bilinear filter for anti-aliased edges
MIN_SHAPE, MAX_SHAPE = SIZE * SCALE // 8, SIZE * SCALE // 2  # shape extent on the big canvas: 16..64 px
GRID = 1024  # PaliGemma's <locNNNN> tokens


@dataclass(frozen=True)
class Measured:
    """What `measure` reads from an image: box (x0, y0, x1, y1) in pixel edges, labels, and the evidence."""

    box: tuple[int, int, int, int]
    shape: str
    color: str
    error: float  # |ideal - measured coverage| / area for the chosen shape (`_fit_errors`)
    margin: float  # the next-best shape's error minus `error`: how clear the choice was
    background: tuple[int, int, int]


def draw(shape: str, color: str, rng: random.Random) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """One easy-VQA-style image and the shape's true box (x0, y0, x1, y1) in its pixel-edge coordinates."""
    big = SIZE * SCALE
    canvas = Image.new("RGB", (big, big), tuple(rng.randint(230, 255) for _ in range(3)))
    pen = ImageDraw.Draw(canvas)
    fill = COLORS[color]
    if shape == "rectangle":
        w, h = rng.randint(MIN_SHAPE, MAX_SHAPE), rng.randint(MIN_SHAPE, MAX_SHAPE)
        x, y = rng.randint(0, big - w), rng.randint(0, big - h)
        # PIL's rectangle includes both corners: [x, x + w - 1] covers exactly w pixels.
        pen.rectangle([x, y, x + w - 1, y + h - 1], fill=fill)
        box = (x, y, x + w, y + h)
    elif shape == "circle":
        d = rng.randint(MIN_SHAPE, MAX_SHAPE)
        x, y = rng.randint(0, big - d), rng.randint(0, big - d)
        pen.ellipse([x, y, x + d - 1, y + d - 1], fill=fill)
        box = (x, y, x + d, y + d)
    elif shape == "triangle":
        s = rng.randint(MIN_SHAPE, MAX_SHAPE)
        height = s * math.sqrt(3) / 2
        x, base = rng.randint(0, big - s), rng.randint(math.ceil(height), big)
        pen.polygon([(x, base), (x + s, base), (x + s / 2, base - height)], fill=fill)
        box = (x, base - height, x + s, base)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    image = canvas.resize((SIZE, SIZE), resample=Image.BILINEAR)
    return image, tuple(v / SCALE for v in box)


def measure(image: Image.Image | np.ndarray) -> Measured:
    """Background, box, colour and shape of an easy-VQA image, read from its pixels alone."""
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)  # H W 3
    border = np.concatenate([px[0], px[-1], px[1:-1, 0], px[1:-1, -1]])  # the outermost ring, N 3
    bg = _mode(border)

    diff = px.astype(np.float32) - bg.astype(np.float32)  # H W 3
    far = (diff * diff) @ np.ones(3, np.float32) > 64**2  # surely not background: fill colours are >= 102 away
    if not far.any():
        raise ValueError("no shape found: every pixel is within 64 levels of the background")
    core = _mode(px[far])
    color = NAMES[int(np.argmin(((PALETTE - core) ** 2).sum(1)))]

    ref = (PALETTE[NAMES.index(color)] - bg).astype(np.float32)  # background -> fill colour, 3
    coverage = np.clip(diff @ (ref / (ref @ ref)), 0.0, 1.0)  # H W: 0 = background, 1 = fill colour
    ys, xs = np.nonzero(coverage >= 0.5)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    errors = _fit_errors(coverage, box)
    shape = min(errors, key=errors.get)
    margin = sorted(errors.values())[1] - errors[shape]
    return Measured(box, shape, color, errors[shape], margin, tuple(int(v) for v in bg))


def _fit_errors(coverage: np.ndarray, box: tuple[int, int, int, int]) -> dict[str, float]:
    """Per shape: |ideal - measured coverage| summed, / area, for the ideal shape with the measured area and centroid.

    Fitting by moments (area, centroid; the rectangle's aspect from the variances) rather than to the box makes the
    fit independent of how anti-aliasing moved the box's edges. An ideal shape's coverage of a pixel is
    clip(0.5 + d, 0, 1), d the signed distance from the pixel's centre to the shape's edge (inside > 0): a
    one-pixel linear ramp, like the 2x-drawn, bilinear-halved edges of the package.
    """
    h, w = coverage.shape
    x0, y0, x1, y1 = max(box[0] - 2, 0), max(box[1] - 2, 0), min(box[2] + 2, w), min(box[3] + 2, h)
    cov = coverage[y0:y1, x0:x1]  # h' w', every partly covered pixel of the shape (blur reaches < 2 px out)
    area = float(cov.sum())
    X, Y = np.arange(x0, x1) + 0.5, (np.arange(y0, y1) + 0.5)[:, None]  # pixel centres: a row and a column
    cx, cy = float((cov * X).sum()) / area, float((cov * Y).sum()) / area
    vx, vy = float((cov * (X - cx) ** 2).sum()) / area, float((cov * (Y - cy) ** 2).sum()) / area

    rect_h = math.sqrt(area / math.sqrt(vx / vy))  # w / h = sqrt(vx / vy) for a rectangle
    side = math.sqrt(4 * area / math.sqrt(3))
    base = cy + side / (2 * math.sqrt(3))  # an apex-up triangle's centroid is 1/3 of its height above the base
    # Distance inside the nearer slanted side (at 60 degrees, through the base's ends and the apex).
    slant = (side / 2 - np.abs(X - cx)) * (math.sqrt(3) / 2) - (base - Y) / 2
    inside = {
        "circle": math.sqrt(area / math.pi) - np.sqrt((X - cx) ** 2 + (Y - cy) ** 2),
        "rectangle": np.minimum(area / rect_h / 2 - np.abs(X - cx), rect_h / 2 - np.abs(Y - cy)),
        "triangle": np.minimum(base - Y, slant),
    }
    return {k: float(np.abs(np.clip(0.5 + d, 0.0, 1.0) - cov).sum()) / area for k, d in inside.items()}


def _mode(rgb: np.ndarray) -> np.ndarray:
    """The most common colour of an N x 3 integer array (ties: the smallest packed value)."""
    rgb = rgb.astype(np.int32)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    top = int(values[counts.argmax()])
    return np.array([top >> 16, (top >> 8) & 255, top & 255])


def loc_tokens(box: tuple[float, float, float, float], width: int, height: int) -> str:
    """`<locY0><locX0><locY1><locX1>` for a pixel-edge box, loc = round(y / height * 1023)."""
    x0, y0, x1, y1 = box
    locs = (v / size * (GRID - 1) for v, size in ((y0, height), (x0, width), (y1, height), (x1, width)))
    return "".join(f"<loc{min(max(round(v), 0), GRID - 1):04d}>" for v in locs)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
