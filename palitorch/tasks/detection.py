"""Detection output: PaliGemma's `<locY0><locX0><locY1><locX1> label` text -> boxes in image pixels.

PaliGemma answers `detect cat ; dog` with one group per object, groups joined by ` ; `:

    <loc0256><loc0128><loc0767><loc0896> cat ; <loc0000><loc0000><loc0511><loc0511> dog

The four numbers are y0, x0, y1, x1 on a 0..1023 grid over the (square, resized) model input, so a pixel
coordinate in the original image is `loc / 1023 * height` for y and `loc / 1023 * width` for x (big_vision's
evaluator; some demos divide by 1024, which shifts boxes by under 0.1%). A segmentation answer puts 16 `<segNNN>`
codes between the locations and the label; segmentation.py reads those.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

from palitorch.errors import InputError

LOC_GRID = 1023  # the largest <locNNNN>: coordinates are loc / 1023 of the image side
NUM_SEG_CODES = 16
EOS = "<eos>"  # the end of an answer, when text decoded with special tokens kept shows it

# An object starts at a run of <loc> tokens (four, or it is malformed); any <seg> tokens, then its label, follow
# (spaces tolerated everywhere). Both patterns match in linear time, whatever the text.
_LOC_RUN = re.compile(r"(?:<loc\d{4}>\s*)+")
_SEG_RUN = re.compile(r"(?:<seg\d{3}>\s*)*")
_NUMBER = re.compile(r"\d+")
_ANY_LOC_SEG = re.compile(r"<(?:loc|seg)\d+>")


@dataclass(frozen=True)
class Detection:
    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the original image's pixels, x0 <= x1, y0 <= y1

    def to_dict(self) -> dict:
        return {"label": self.label, "box": [round(v, 2) for v in self.box]}


def split_objects(text: str) -> list[tuple[tuple[int, int, int, int], tuple[int, ...], str]]:
    """The objects of an answer as (locs y0 x0 y1 x1, seg codes, label), in order; malformed ones dropped.

    Objects are separated by `;`, and a run of <loc> tokens also starts a new one (an answer can miss a separator,
    or start with other text, which is skipped; big_vision's demo parser recovers both too). An object is malformed
    when its run has other than four <loc> tokens, or when <seg> tokens follow its label. The answer ends at its
    first `<eos>` (text decoded with special tokens kept, as transformers' `decode(..., skip_special_tokens=False)`
    gives it, ends `cat<eos>`, then maybe `<pad>`s): Google's parser ends a label at a `<`, so neither is a label's.
    """
    objects = []
    for chunk in text.split(EOS, 1)[0].split(";"):
        runs = list(_LOC_RUN.finditer(chunk))
        for run, after in zip(runs, [r.start() for r in runs[1:]] + [len(chunk)]):
            locs = tuple(int(n) for n in _NUMBER.findall(run.group()))
            segs = _SEG_RUN.match(chunk, run.end(), after)
            label = chunk[segs.end():after].strip()
            if len(locs) != 4 or _ANY_LOC_SEG.search(label):
                continue
            objects.append((locs, tuple(int(n) for n in _NUMBER.findall(segs.group())), label))
    return objects


def locs_to_box(locs: tuple[int, int, int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) on the 0..1023 grid -> (x0, y0, x1, y1) in pixels, clamped to the image and ordered."""
    y0, x0, y1, x1 = (min(max(v, 0), LOC_GRID) / LOC_GRID for v in locs)
    x0, x1 = sorted((x0 * width, x1 * width))
    y0, y1 = sorted((y0 * height, y1 * height))
    return (x0, y0, x1, y1)


def image_size(width, height=None) -> tuple[float, float]:
    """(width, height) as given, or, when `width` is an image (PIL image, path, bytes or array) and no height is
    given, the image's size once upright by its EXIF orientation: the size of the image the model saw."""
    if height is None and not isinstance(width, numbers.Real):
        from palitorch.inference.images import load_image

        return load_image(width).size
    return width, height


def check_answer(text, width, height, what: str) -> None:
    """InputError unless `text` is an answer's text and the image's sides are numbers > 0 (`what`: the caller)."""
    if not isinstance(text, str):
        hint = " (Result.text)" if hasattr(text, "text") else ""
        raise InputError(f"{what} takes the answer's text{hint}, got {type(text).__name__}")
    for name, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, numbers.Real) or not (math.isfinite(side) and side > 0):
            raise InputError(f"{what}: the image's {name} must be a number of pixels > 0, got {side!r}")


def parse_detections(text: str, width, height=None) -> list[Detection]:
    """Every well-formed object in a detection (or segmentation) answer, with its box in pixels of a
    `width` x `height` image, or of the image given as `width` (then upright by its EXIF orientation, as the
    model saw it). Objects with other than four locations are skipped; locations past the grid are clamped to
    the image's edge; a box given as (y1, x1, y0, x0) is put back in order; text from an `<eos>` on is not read
    (the answer ended there). InputError if `text` is not a string (give `Result.text`) or a side is not > 0."""
    width, height = image_size(width, height)
    check_answer(text, width, height, "parse_detections")
    return [Detection(label, locs_to_box(locs, width, height)) for locs, _, label in split_objects(text)]
