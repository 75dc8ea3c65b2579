"""easy-VQA (PyPI `easy-vqa`) as PaliGemma training data: JSONL with three tasks in PaliGemma's prompt style.

    convert("data/easyvqa")          # or: palitorch data easyvqa --out data/easyvqa [--extra N] [--limit N]
                                     #     [--balanced-yesno]: + 8 yes/no questions per training image

writes, under the output folder:
    train.jsonl, test.jsonl    one JSON object a line: {"image", "prefix", "suffix", "task"[, "qtype"]}
    images/{train,test,extra}/ copies of the package's PNGs (and the generated ones), named by image id
    summary.json               the counts, label checks and box checks printed by the command

Image paths in the JSONL are relative to the JSONL's folder (so the folder can be moved or copied to another
machine); `palitorch.train.data.read_jsonl` resolves them. Per image, the lines are
    vqa      "answer en <question>"  -> "<answer>"                 qtype: "yesno" | "color" | "shape"
    caption  "caption en"             -> "<colour> <shape>"         e.g. "teal circle"
    detect   "detect <shape>"         -> "<locY0><locX0><locY1><locX1> <shape>"
The test split is the package's official one, all of it (1,000 images, 9,673 questions); generated images
(`extra`) only ever join the training split.

Labels. The colour and shape of each image are measured from its pixels (`shapes.measure`) and cross-checked
against every answer about the image: each question/answer pair constrains the (shape, colour) pair, negated
questions ("is there not a circle?", "is no red shape present?") included. Because the package samples only
~10 of its 96 possible questions per image, the answers alone leave some images ambiguous; pixels decide those.
A measured label that contradicts an answer is a conflict: the answer wins and `summary.json` lists it.
Boxes come from the pixels only; see `shapes` for the method and the <loc> convention (loc = round(y / H * 1023)).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from palitorch.errors import InputError, PalitorchError
from palitorch.train import shapes
from palitorch.train.shapes import COLORS, SHAPES

ANY_SHAPE, ANY_COLOR = frozenset(SHAPES), frozenset(COLORS)

# The package's question templates ({s}: a shape, {c}: a colour; {x}: a shape or "<colour> shape"), and the
# chance that an image gets each one.
WHAT_SHAPE = ("what shape is in the image?", "what shape is present?", "what shape does the image contain?",
              "what is the {c} shape?")
WHAT_COLOR = ("what color is the {s}?", "what is the color of the {s}?", "what color is the shape?",
              "what is the color of the shape?")
IS_THERE = ("is there a {x}?", "is there a {x} in the image?", "does the image contain a {x}?", "is a {x} present?")
IS_NOT = ("is there not a {x}?", "is there not a {x} in the image?", "does the image not contain a {x}?",
          "is no {x} present?")
WHAT_RATE, YESNO_RATE = 0.32, 0.08  # 8 * 0.32 + 88 * 0.08 = 9.6 questions per image, as in the package


@dataclass(frozen=True)
class Question:
    """What a question asks. `shape`/`color`: the value the question names, if any; `negated`: yes means absent."""

    qtype: str  # "shape" | "color" | "yesno"
    shape: str | None = None
    color: str | None = None
    negated: bool = False

    def answer(self, shape: str, color: str) -> str:
        """The right answer for an image of this shape and colour."""
        if self.qtype == "shape":
            return shape
        if self.qtype == "color":
            return color
        present = shape == self.shape if self.shape else color == self.color
        return "yes" if present != self.negated else "no"

    def allows(self, answer: str) -> tuple[frozenset[str], frozenset[str]]:
        """The shapes and colours an image can have, given this question's answer."""
        if self.qtype == "shape":
            return frozenset({answer}), frozenset({self.color}) if self.color else ANY_COLOR
        if self.qtype == "color":
            return frozenset({self.shape}) if self.shape else ANY_SHAPE, frozenset({answer})
        if answer not in ("yes", "no"):
            raise InputError(f"a yes/no question answered {answer!r}")
        present = (answer == "yes") != self.negated
        if self.shape:
            return (frozenset({self.shape}) if present else ANY_SHAPE - {self.shape}), ANY_COLOR
        return ANY_SHAPE, (frozenset({self.color}) if present else ANY_COLOR - {self.color})


def _question_table() -> dict[str, Question]:
    """Every question text the templates can produce -> what it asks."""
    table = {t: Question("shape") for t in WHAT_SHAPE if "{c}" not in t}
    table |= {t: Question("color") for t in WHAT_COLOR if "{s}" not in t}
    for s in SHAPES:
        table |= {t.format(s=s): Question("color", shape=s) for t in WHAT_COLOR if "{s}" in t}
        table |= {t.format(x=s): Question("yesno", shape=s) for t in IS_THERE}
        table |= {t.format(x=s): Question("yesno", shape=s, negated=True) for t in IS_NOT}
    for c in COLORS:
        table |= {t.format(c=c): Question("shape", color=c) for t in WHAT_SHAPE if "{c}" in t}
        table |= {t.format(x=f"{c} shape"): Question("yesno", color=c) for t in IS_THERE}
        table |= {t.format(x=f"{c} shape"): Question("yesno", color=c, negated=True) for t in IS_NOT}
    return table


QUESTIONS = _question_table()
_YESNO_BY_VALUE: dict[tuple[str, str, bool], list[str]] = {}  # ("color" | "shape", value, negated) -> texts
for _text, _q in QUESTIONS.items():
    if _q.qtype == "yesno":
        _YESNO_BY_VALUE.setdefault(("shape", _q.shape, _q.negated) if _q.shape else ("color", _q.color, _q.negated),
                                   []).append(_text)


def parse_question(text: str) -> Question:
    """What an easy-VQA question asks; InputError for a question outside the templates."""
    try:
        return QUESTIONS[text]
    except KeyError:
        raise InputError(f"not an easy-VQA question: {text!r}") from None


def sample_questions(shape: str, color: str, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs for a generated image, drawn from the templates at the package's rates."""
    pairs = []
    for text, q in QUESTIONS.items():
        if (q.qtype == "shape" and q.color not in (None, color)) or \
                (q.qtype == "color" and q.shape not in (None, shape)):
            continue  # "what is the red shape?" is only asked of red shapes
        if rng.random() < (YESNO_RATE if q.qtype == "yesno" else WHAT_RATE):
            pairs.append((text, q.answer(shape, color)))
    return pairs


def balanced_yesno(shape: str, color: str, rng: random.Random) -> list[tuple[str, str]]:
    """Eight yes/no questions about one image whose answers the question text cannot predict.

    The package asks "is there a <colour> shape?" mostly about absent colours (7 of 8), so its yes/no answers are
    82.5% predictable from the text alone; a small model learns that prior within a few hundred steps and is slow to
    learn to compare the question's word with the image. Here, for colour and for shape, plain and negated, one
    question names what the image shows and one names a random other value: every (kind, negation) is half yes.
    """
    pairs = []
    for kind, true, values in (("color", color, sorted(COLORS)), ("shape", shape, list(SHAPES))):
        false = rng.choice([v for v in values if v != true])
        for negated in (False, True):
            for value in (true, false):
                text = rng.choice(_YESNO_BY_VALUE[kind, value, negated])
                pairs.append((text, "yes" if (value == true) != negated else "no"))
    return pairs


def labels_from_answers(qa: list[tuple[str, str]]) -> tuple[frozenset[str], frozenset[str]]:
    """The shapes and colours consistent with all of an image's answers (one each when the answers pin it down)."""
    allowed_shapes, allowed_colors = ANY_SHAPE, ANY_COLOR
    for text, answer in qa:
        s, c = parse_question(text).allows(answer)
        allowed_shapes, allowed_colors = allowed_shapes & s, allowed_colors & c
    return allowed_shapes, allowed_colors


def records(image: str, qa: list[tuple[str, str]], shape: str, color: str, box,
            balanced: list[tuple[str, str]] = ()) -> list[dict]:
    """The JSONL lines of one image: its questions, then one caption and one detection, then `balanced` questions
    (marked `"source": "balanced"`)."""
    lines = [{"image": image, "prefix": f"answer en {q}", "suffix": a, "task": "vqa",
              "qtype": parse_question(q).qtype} for q, a in qa]
    lines.append({"image": image, "prefix": "caption en", "suffix": f"{color} {shape}", "task": "caption"})
    locs = shapes.loc_tokens(box, shapes.SIZE, shapes.SIZE)
    lines.append({"image": image, "prefix": f"detect {shape}", "suffix": f"{locs} {shape}", "task": "detect"})
    lines += [{"image": image, "prefix": f"answer en {q}", "suffix": a, "task": "vqa", "qtype": "yesno",
               "source": "balanced"} for q, a in balanced]
    return lines


@dataclass
class Summary:
    """What `convert` wrote and what its checks found."""

    lines: dict[str, Counter] = field(default_factory=dict)  # split -> {"vqa/yesno": n, "caption": n, ...}
    images: Counter = field(default_factory=Counter)  # split -> images
    # "split/shape" | "split/color" -> images the answers leave open
    ambiguous: Counter = field(default_factory=Counter)
    conflicts: list[str] = field(default_factory=list)  # measured label contradicting an answer
    fit: dict[str, list[float]] = field(default_factory=dict)  # shape -> [max error, min margin] of shape fits
    extra_iou: list[float] = field(default_factory=list)  # [mean, min] IoU, measured vs drawn box (extra images)

    def note_fit(self, m: shapes.Measured) -> None:
        err, margin = self.fit.get(m.shape, [0.0, float("inf")])
        self.fit[m.shape] = [max(err, m.error), min(margin, m.margin)]

    def text(self) -> str:
        generated = f" + {self.images['extra']} generated" if self.images["extra"] else ""
        rows = [f"{split}: {self.images[split]} images{generated if split == 'train' else ''}; lines: "
                + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for split, c in self.lines.items()]
        rows.append("answers leave open: " + (", ".join(f"{k} {v}" for k, v in sorted(self.ambiguous.items()))
                                              or "nothing"))
        rows.append(f"label conflicts (pixels vs answers): {len(self.conflicts)}")
        rows.append("shape fits (error / area, worst; margin to the next shape, least): " + ", ".join(
            f"{s} {err:.3f}, {margin:.3f}" for s, (err, margin) in sorted(self.fit.items())))
        if self.extra_iou:
            rows.append(f"extra images, measured vs drawn box: mean IoU {self.extra_iou[0]:.3f}, "
                        f"min {self.extra_iou[1]:.3f}")
        return "\n".join(rows)


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise PalitorchError("the easy-vqa package is not installed: pip install 'palitorch[data]'") from None
    return easy_vqa


def _label(summary: Summary, split: str, key, qa, measured: shapes.Measured) -> tuple[str, str]:
    """The image's (shape, colour): the measured one, unless an answer rules it out (a conflict, logged)."""
    allowed_shapes, allowed_colors = labels_from_answers(qa)
    shape, color = measured.shape, measured.color
    for kind, allowed in (("shape", allowed_shapes), ("color", allowed_colors)):
        if len(allowed) > 1:
            summary.ambiguous[f"{split}/{kind}"] += 1
    if shape not in allowed_shapes or color not in allowed_colors:
        summary.conflicts.append(f"{split} image {key}: pixels say {color} {shape}, answers allow "
                                 f"{sorted(allowed_colors)} {sorted(allowed_shapes)}")
        shape = shape if len(allowed_shapes) != 1 else next(iter(allowed_shapes))
        color = color if len(allowed_colors) != 1 else next(iter(allowed_colors))
    summary.note_fit(measured)
    return shape, color


def convert(out: str | os.PathLike, limit: int | None = None, extra: int = 0, seed: int = 0,
            copy_images: bool = True, progress: bool = False, balanced: bool = False) -> Summary:
    """Write train.jsonl and test.jsonl (and the images) under `out`; `limit` keeps the first N images per split.

    `balanced` adds `balanced_yesno` questions to every training image (never to the test split).

    `copy_images=False` points the JSONL at the installed package's PNGs by absolute path instead of copying them:
    no 22 MB of copies, but the folder then only works where that package is installed.
    """
    package = _package()
    out = Path(out)
    summary = Summary()
    rng = random.Random(seed + 1)
    used: set[str] = set()  # the image paths the JSONL files name
    sources = {"train": (package.get_train_questions(), package.get_train_image_paths()),
               "test": (package.get_test_questions(), package.get_test_image_paths())}
    for split, ((texts, answers, ids), paths) in sources.items():
        keep = sorted(paths)[:limit]
        qa = {k: [] for k in keep}
        for text, answer, key in zip(texts, answers, ids):
            if key in qa:
                qa[key].append((text, answer))
        (out / "images" / split if copy_images else out).mkdir(parents=True, exist_ok=True)
        lines = []
        for key in tqdm(keep, desc=split, disable=not progress):
            png = Path(paths[key]).read_bytes()
            if copy_images:
                image = f"images/{split}/{key}.png"
                (out / image).write_bytes(png)
            else:
                image = str(Path(paths[key]).resolve())
            measured = shapes.measure(Image.open(io.BytesIO(png)))
            shape, color = _label(summary, split, key, qa[key], measured)
            more = balanced_yesno(shape, color, rng) if (balanced and split == "train") else []
            lines += records(image, qa[key], shape, color, measured.box, more)
        summary.images[split] = len(keep)
        if split == "train" and extra:
            lines += _extra(out, extra, seed, summary, progress, balanced)
        _write_jsonl(out / f"{split}.jsonl", lines)
        used.update(r["image"] for r in lines)
        summary.lines[split] = Counter(r["task"] + (f"/{r['qtype']}" if "qtype" in r else "") for r in lines)
    for split in ("train", "test", "extra"):  # images of an earlier conversion into `out` that no line names now
        for f in sorted((out / "images" / split).glob("*.png")):
            if f"images/{split}/{f.name}" not in used:
                f.unlink()
    (out / "summary.json").write_text(json.dumps(
        {"lines": summary.lines, "images": summary.images, "ambiguous": summary.ambiguous,
         "conflicts": summary.conflicts, "fit": summary.fit, "extra_iou": summary.extra_iou}, indent=1))
    return summary


def _extra(out: Path, n: int, seed: int, summary: Summary, progress: bool, balanced: bool = False) -> list[dict]:
    """`n` generated training images: labelled by what was drawn, boxed by the same measurement as the package's
    images (whose shape and colour must match the drawing, else a conflict); `balanced`: see balanced_yesno."""
    rng = random.Random(seed)
    folder = out / "images" / "extra"
    folder.mkdir(parents=True, exist_ok=True)
    lines, ious = [], []
    for i in tqdm(range(n), desc="extra", disable=not progress):
        shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
        image, true_box = shapes.draw(shape, color, rng)
        rel = f"images/extra/{i}.png"
        image.save(out / rel)
        measured = shapes.measure(image)
        qa = sample_questions(shape, color, rng)
        if (measured.shape, measured.color) != (shape, color):
            summary.conflicts.append(f"extra image {i}: drew {color} {shape}, measured {measured.color} "
                                     f"{measured.shape}")
        summary.note_fit(measured)
        ious.append(shapes.iou(measured.box, true_box))
        lines += records(rel, qa, shape, color, measured.box, balanced_yesno(shape, color, rng) if balanced else [])
    summary.images["extra"] = n
    summary.extra_iou = [sum(ious) / n, min(ious)]
    return lines


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    os.replace(tmp, path)
