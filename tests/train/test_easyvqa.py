"""easy-VQA -> JSONL: question parsing (negations), labels vs answers, boxes vs a brute-force box, split sizes.

One full conversion (all 5,000 package images, no generated ones) is shared by the tests that need the whole
training set or the whole test split; the others use `--limit`.
"""

import dataclasses
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
from PIL import Image

from palitorch.cli import main
from palitorch.tasks import parse_detections
from palitorch.train import shapes
from palitorch.train.easyvqa import (
    QUESTIONS,
    Summary,
    _extra,
    _label,
    convert,
    labels_from_answers,
    parse_question,
    sample_questions,
)

ASSETS = Path(__file__).parents[2] / "palitorch" / "assets"
LINE = re.compile(r"<loc(\d{4})>" * 4 + r" (circle|rectangle|triangle)")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_image(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    out = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[r["image"]][r["task"]].append(r)
    return out


def brute_box(path: Path) -> tuple[int, int, int, int]:
    """Tight box of the pixels farther from the background (the border's most common colour) than half the
    farthest pixel is: a plain loop, independent of shapes.measure."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    px = im.load()
    ring = [(x, y) for x in range(w) for y in range(h) if x in (0, w - 1) or y in (0, h - 1)]
    bg = Counter(px[p] for p in ring).most_common(1)[0][0]
    dist = {(x, y): sum((a - b) ** 2 for a, b in zip(px[x, y], bg)) ** 0.5 for x in range(w) for y in range(h)}
    far = max(dist.values())
    pts = [p for p, d in dist.items() if d > far / 2]
    return min(x for x, _ in pts), min(y for _, y in pts), max(x for x, _ in pts) + 1, max(y for _, y in pts) + 1


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("easyvqa")
    summary = convert(out, copy_images=False)  # absolute paths to the package's PNGs: no 5,000 copies
    return out, summary


def test_negated_questions_flip_the_answer():
    assert parse_question("is there not a circle?").allows("yes")[0] == {"rectangle", "triangle"}
    assert parse_question("is no circle present?").allows("no")[0] == {"circle"}
    assert parse_question("does the image not contain a red shape?").allows("no")[1] == {"red"}
    assert parse_question("is there a red shape?").allows("no")[1] == set(shapes.COLORS) - {"red"}
    assert parse_question("what is the teal shape?").allows("circle") == ({"circle"}, {"teal"})
    # Every template, every image: the right answer allows the image, the wrong yes/no answer rules it out.
    for shape in shapes.SHAPES:
        for color in shapes.COLORS:
            for text, q in QUESTIONS.items():
                if q.qtype != "yesno":
                    continue
                right = q.answer(shape, color)
                s, c = q.allows(right)
                assert shape in s and color in c, text
                s, c = q.allows("no" if right == "yes" else "yes")
                assert shape not in s or color not in c, text
    assert len(QUESTIONS) == 3 + 2 + 3 * 2 + 8 * 1 + 11 * 8  # 107 distinct question texts


def test_every_package_question_parses():
    texts = easy_vqa.get_test_questions()[0] + easy_vqa.get_train_questions()[0]
    qtypes = Counter(parse_question(t).qtype for t in texts)
    assert qtypes["yesno"] == 7136 + 28407  # the package README's yes/no counts


def test_test_split_is_the_official_one_untouched(full):
    out, summary = full
    rows = read(out / "test.jsonl")
    texts, answers, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    vqa = [r for r in rows if r["task"] == "vqa"]
    assert len(vqa) == len(texts) == 9673
    assert sorted((r["prefix"], r["suffix"], r["image"]) for r in vqa) == sorted(
        (f"answer en {t}", a, str(Path(paths[i]).resolve())) for t, a, i in zip(texts, answers, ids))
    images = by_image(rows)
    assert len(images) == summary.images["test"] == 1000
    assert all(len(t["caption"]) == 1 and len(t["detect"]) == 1 for t in images.values())
    assert summary.lines["test"] == Counter({"vqa/yesno": 7136, "vqa/color": 1280, "vqa/shape": 1257,
                                             "caption": 1000, "detect": 1000})


def test_captions_reproduce_every_training_answer(full):
    out, summary = full
    images = by_image(read(out / "train.jsonl"))
    assert len(images) == 4000
    checked = 0
    for image, tasks in images.items():
        (caption,) = tasks["caption"]
        color, shape = caption["suffix"].split()
        assert shape in shapes.SHAPES and color in shapes.COLORS
        for r in tasks["vqa"]:
            assert parse_question(r["prefix"].removeprefix("answer en ")).answer(shape, color) == r["suffix"], image
            checked += 1
        (detect,) = tasks["detect"]
        assert detect["prefix"] == f"detect {shape}" and detect["suffix"].endswith(f" {shape}")
    assert checked == 38575
    assert summary.conflicts == []
    # The answers alone leave some images open (the pixels decide those): the check above covers them too.
    assert summary.ambiguous["train/shape"] > 0 and summary.ambiguous["train/color"] > 0


def test_cli_limit_lines_and_boxes(tmp_path):
    out = tmp_path / "evqa"
    boxes = 0
    assert main(["data", "easyvqa", "--out", str(out), "--limit", "15", "--extra", "10", "--balanced-yesno"]) == 0
    for split, n_images in (("train", 25), ("test", 15)):
        rows = read(out / f"{split}.jsonl")
        assert len(by_image(rows)) == n_images
        # Balanced yes/no questions: 8 per training image, right by the image's caption; never in the test split.
        captions = {r["image"]: r["suffix"].split() for r in rows if r["task"] == "caption"}
        balanced = [r for r in rows if r.get("source") == "balanced"]
        assert len(balanced) == (8 * n_images if split == "train" else 0)
        for r in balanced:
            color, shape = captions[r["image"]]
            assert parse_question(r["prefix"][10:]).answer(shape, color) == r["suffix"]
        for r in rows:
            assert all(isinstance(r[k], str) for k in ("image", "prefix", "suffix")), r
            assert (out / r["image"]).is_file()  # relative to the JSONL's folder
            assert ("qtype" in r) == (r["task"] == "vqa")
            if r["task"] == "vqa":
                assert r["prefix"].startswith("answer en ") and r["qtype"] == parse_question(r["prefix"][10:]).qtype
            elif r["task"] == "caption":
                assert r["prefix"] == "caption en" and len(r["suffix"].split()) == 2
            else:
                assert r["task"] == "detect" and LINE.fullmatch(r["suffix"]), r
                shape = r["prefix"].removeprefix("detect ")
                (det,) = parse_detections(r["suffix"], 64, 64)
                assert det.label == shape
                # The <loc> grid is finer than a pixel: decoding lands within half a grid step (64 / 2046 px)
                # of the integer pixel box, and that box is within 1 px per edge of the brute-force one
                # (anti-aliased edge pixels near half coverage may fall either way).
                box = [round(v) for v in det.box]
                assert max(abs(a - b) for a, b in zip(det.box, box)) <= 64 / 2046 + 1e-9
                truth = brute_box(out / r["image"])
                assert max(abs(a - b) for a, b in zip(box, truth)) <= 1, (r, truth)
                boxes += 1
    assert boxes == 25 + 15
    assert main(["data", "easyvqa", "--out", str(out), "--limit", "0"]) == 2
    # Converting again into the folder replaces it: no image of the first conversion that no line names is left.
    assert main(["data", "easyvqa", "--out", str(out), "--limit", "5"]) == 0
    named = {r["image"] for split in ("train", "test") for r in read(out / f"{split}.jsonl")}
    assert {str(f.relative_to(out)) for f in (out / "images").rglob("*.png")} == named and len(named) == 10


def test_generated_images_are_measured_back():
    rng = random.Random(7)
    ious = []
    for _ in range(300):
        shape, color = rng.choice(shapes.SHAPES), rng.choice(sorted(shapes.COLORS))
        image, drawn = shapes.draw(shape, color, rng)
        assert image.size == (64, 64)
        m = shapes.measure(image)
        assert (m.shape, m.color) == (shape, color)
        ious.append(shapes.iou(m.box, drawn))
    # Tolerance: pixel boxes of 8..32 px shapes vs their exact outlines (measured: mean 0.94, min 0.77).
    assert min(ious) > 0.7 and sum(ious) / len(ious) > 0.9


def test_generated_questions_follow_the_package_templates():
    rng = random.Random(0)
    pairs = [p for _ in range(400) for p in sample_questions("triangle", "gray", rng)]
    assert 8.5 < len(pairs) / 400 < 10.5  # the package averages 9.6 questions an image
    assert labels_from_answers(pairs) == ({"triangle"}, {"gray"})


def test_loc_tokens_round_trip():
    assert shapes.loc_tokens((0, 0, 64, 64), 64, 64) == "<loc0000><loc0000><loc1023><loc1023>"
    for edge in range(65):
        box = (edge, 64 - edge, 64, 64)
        (det,) = parse_detections(shapes.loc_tokens(box, 64, 64) + " circle", 64, 64)
        assert max(abs(a - b) for a, b in zip(det.box, box)) <= 64 / 2046 + 1e-9  # half a grid step


def test_demo_assets_match_the_package():
    demo = json.loads((ASSETS / "demo.json").read_text())["examples"]
    texts, answers, ids = easy_vqa.get_test_questions()
    truth = {(i, t): a for t, a, i in zip(texts, answers, ids)}
    assert len(demo) >= 6
    for ex in demo:
        path = ASSETS / ex["image"]
        assert path.stat().st_size < 4096
        key = int(re.fullmatch(r"easyvqa_test_(\d+)\.png", ex["image"]).group(1))
        assert path.read_bytes() == Path(easy_vqa.get_test_image_paths()[key]).read_bytes()
        assert truth[key, ex["question"]] == ex["answer"]
        m = shapes.measure(Image.open(path))
        assert ex["caption"] == f"{m.color} {m.shape}" and list(m.box) == ex["box"]


def test_balanced_yesno_questions_carry_no_text_prior():
    """Every answer is right, and for each (colour or shape, plain or negated) half the answers are yes."""
    import random
    from collections import Counter

    from palitorch.train.easyvqa import balanced_yesno, parse_question

    rng = random.Random(1)
    counts, texts = Counter(), set()
    for shape, color in [("circle", "red"), ("triangle", "teal"), ("rectangle", "gray")] * 50:
        for text, answer in balanced_yesno(shape, color, rng):
            q = parse_question(text)
            assert q.qtype == "yesno" and q.answer(shape, color) == answer
            counts["color" if q.color else "shape", q.negated, answer] += 1
            texts.add(text)
    for kind in ("color", "shape"):
        for negated in (False, True):
            assert counts[kind, negated, "yes"] == counts[kind, negated, "no"] == 150
    assert len(texts) > 60  # templates and the named false values vary


def test_a_colour_question_about_a_named_shape_pins_the_shape():
    assert parse_question("what color is the circle?").allows("red") == ({"circle"}, {"red"})
    assert labels_from_answers([("what is the color of the triangle?", "teal")]) == ({"triangle"}, {"teal"})


def test_generated_questions_come_at_the_package_rates():
    """Per image 8 what-questions apply at 0.32 each and 88 yes/no questions at 0.08 each: 2.56 + 7.04 (the package's
    9.6). 2,000 images: each mean within ~4 standard errors."""
    rng = random.Random(3)
    kinds = Counter(parse_question(t).qtype == "yesno" for _ in range(2000) for t, _ in
                    sample_questions("circle", "blue", rng))
    assert abs(kinds[False] / 2000 - 2.56) < 0.12 and abs(kinds[True] / 2000 - 7.04) < 0.25


def test_answers_win_over_pixels_and_open_labels_are_counted():
    """A measured label an answer rules out is a conflict: the answers decide it where they pin it down, else the
    pixels' label stays. Only what the answers leave open counts as ambiguous."""
    summary = Summary()
    measured = shapes.Measured((1, 1, 9, 9), "circle", "red", 0.05, 0.2, (240, 240, 240))
    qa = [("what shape is in the image?", "triangle"), ("is there a blue shape?", "no")]
    assert _label(summary, "train", 7, qa, measured) == ("triangle", "red")
    assert summary.conflicts == ["train image 7: pixels say red circle, answers allow "
                                 f"{sorted(set(shapes.COLORS) - {'blue'})} ['triangle']"]
    assert summary.ambiguous == Counter({"train/color": 1})
    # The fit statistics keep the worst error and the least margin of each shape.
    summary.note_fit(shapes.Measured((1, 1, 9, 9), "triangle", "red", 0.02, 0.5, (240, 240, 240)))
    summary.note_fit(shapes.Measured((1, 1, 9, 9), "circle", "red", 0.01, 0.4, (240, 240, 240)))
    assert summary.fit == {"circle": [0.05, 0.2], "triangle": [0.02, 0.5]}


def test_generated_images_keep_the_drawn_label_and_log_a_mismatch(tmp_path, monkeypatch):
    """A generated image is labelled by what was drawn; a measurement that disagrees is logged as a conflict."""
    real = shapes.measure
    monkeypatch.setattr(shapes, "measure", lambda im: dataclasses.replace(real(im), color="black")
                        if real(im).color != "black" else real(im))
    summary = Summary()
    lines = _extra(tmp_path, 4, 0, summary, progress=False)
    drawn = [r["suffix"] for r in lines if r["task"] == "caption"]
    wrong = [i for i, d in enumerate(drawn) if not d.startswith("black ")]
    assert wrong and summary.conflicts == [f"extra image {i}: drew {drawn[i]}, measured black {drawn[i].split()[1]}"
                                           for i in wrong]
    mean, least = summary.extra_iou
    assert 0.7 < least < mean < 1  # [mean, min] of the four boxes' IoU


def test_limit_keeps_the_lowest_image_ids(tmp_path):
    """The package lists its images in directory order; --limit N takes images 0..N-1 on every machine."""
    convert(tmp_path, limit=3)
    for split in ("train", "test"):
        assert {r["image"] for r in read(tmp_path / f"{split}.jsonl")} == {f"images/{split}/{i}.png" for i in range(3)}


def test_box_helpers_at_their_edges():
    """loc tokens stay on the grid for a box past the image; disjoint or empty boxes overlap 0."""
    assert shapes.loc_tokens((-3, -1, 70, 66), 64, 64) == "<loc0000><loc0000><loc1023><loc1023>"
    assert shapes.iou((0, 0, 2, 2), (5, 0, 7, 2)) == 0.0  # apart in x: no negative "overlap"
    assert shapes.iou((0, 0, 4, 4), (5, 5, 9, 9)) == 0.0  # apart in x and y: two negatives make no overlap
    assert shapes.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert shapes.iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)


def test_draw_and_measure_edges():
    """Backgrounds are light (every channel 230..255) and measured back; shapes span 8..32 px; an unknown shape or
    an image without a shape is refused by name."""
    rng = random.Random(5)
    widths = []
    for _ in range(200):
        image, box = shapes.draw(rng.choice(shapes.SHAPES), "red", rng)
        m = shapes.measure(image)
        assert m.background == Counter(map(tuple, np.asarray(image).reshape(-1, 3).tolist())).most_common(1)[0][0]
        assert all(230 <= c <= 255 for c in m.background)
        widths.append(box[2] - box[0])
    assert min(widths) < 10 and max(widths) > 30
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        shapes.draw("hexagon", "red", rng)
    with pytest.raises(ValueError, match="no shape found"):
        shapes.measure(Image.new("RGB", (64, 64), (240, 240, 240)))
