"""Training and eval data about several images per example (`"image": [a, b]`, NLVR2's pairs, video frames): the
batch against transformers' processor and model on nested images, a short run that resumes, and one-line errors.

Tolerances: as tests/model/test_parity.py (logits 1e-4 absolute, loss 1e-5: both run the same float32 operations).
"""

import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import palitorch
from palitorch.errors import ConfigError
from palitorch.train import ddp
from palitorch.train.config import AugmentConfig
from palitorch.train.data import Dataset, augment, read_jsonl
from palitorch.train.evaluate import exact_match
from palitorch.train.images import ImageError, Images
from palitorch.train.loop import Trainer

from hf_factory import diverse, hf_processor
from trainkit import config, losses, make_data

LOGIT_TOL, LOSS_TOL = 1e-4, 1e-5

# A mix of two, one, three and a list of one image per example (images shared across rows, and within row 3)
ROWS = [(["a.png", "b.png"], "answer en are they alike?", "no"),
        ("c.png", "caption en", "a small cat on a mat"),
        (["d.png", "a.png", "b.png"], "answer en which one differs?", "the first"),
        (["c.png"], "detect cat", "<loc0010><loc0020><loc0500><loc0600> cat")]


def write_rows(folder, rows, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"image": im, "prefix": p, "suffix": s, **(extra or {})} for im, p, s in rows]
    (folder / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder / "data.jsonl"


def write_images(folder, names, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 57 + 5 * i, 3), dtype=np.uint8)).save(folder / name)


@pytest.mark.parametrize("version", [1, 2])
def test_a_mixed_batch_gives_transformers_loss_and_logits(request, tmp_path, version):
    folder, hf = request.getfixturevalue(f"pg{version}")
    pipe = palitorch.load(folder)
    write_images(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    data = Dataset(read_jsonl(write_rows(tmp_path, ROWS)), pipe.processor,
                   Images(pipe.processor.image_size, resample=pipe.processor.resample))
    batch = data.batch([0, 1, 2, 3])
    assert data.paths([0, 1, 2, 3]) == [tmp_path / n for n in ("a.png", "b.png", "c.png", "d.png")]
    assert batch["image_index"].tolist() == [0, 1, 2, 3, 0, 1, 2]  # flat: each row's images in order
    assert batch["pixel_values"].shape[0] == 4  # each distinct image once

    def load(name):
        return Image.open(tmp_path / name)

    nested = [[load(n) for n in im] if isinstance(im, list) else [load(im)] for im, _, _ in ROWS]
    inputs = hf_processor(folder)(images=nested, text=[p for _, p, _ in ROWS], suffix=[s for _, _, s in ROWS],
                                  return_tensors="pt", padding="longest")
    for k in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(batch[k], inputs[k]), k
    torch.testing.assert_close(batch["pixel_values"][batch["image_index"]], inputs["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        ref = hf(**inputs)
        ours = pipe.model(**batch)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[valid], ref.logits[valid], atol=LOGIT_TOL, rtol=0)
    assert abs(ours.loss.item() - ref.loss.item()) < LOSS_TOL


def test_each_distinct_image_is_augmented_once_and_grouped_examples_stay_together(pg1, tmp_path):
    folder, _ = pg1
    proc = palitorch.load(folder).processor
    write_images(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    rows = ROWS + [(["a.png", "b.png"], "caption en", "two"), (["b.png", "a.png"], "caption en", "two")]
    data = Dataset(read_jsonl(write_rows(tmp_path, rows)), proc, Images(proc.image_size), per_image=2)
    assert data.image_ids.tolist() == [0, 1, 2, 1, 0, 3]  # one "image" per list of images (["c"] is "c")
    aug = AugmentConfig(brightness=0.3, noise=0.05)
    got = data.batch([0, 4, 5], aug, seed=3, step=7)
    raw = Images(proc.image_size).batch([tmp_path / "a.png", tmp_path / "b.png"])
    keys = [zlib.crc32(str(tmp_path / n).encode()) % 1_000_003 for n in ("a.png", "b.png")]
    want = proc.normalize(augment(raw, aug, 3, 7, keys))
    torch.testing.assert_close(got["pixel_values"], want)
    assert got["image_index"].tolist() == [0, 1, 0, 1, 1, 0]
    for epoch in range(3):  # the two examples of the pair [a, b] come one after the other
        order = data.order(len(data), 0, epoch).tolist()
        assert sorted(order) == list(range(6)) and abs(order.index(0) - order.index(4)) == 1


@pytest.mark.parametrize("image, message", [
    ([], r'data.jsonl:2: "image" is an empty list: give a path, or a list of 1 to 16 paths$'),
    (["a.png"] * 17, r'data.jsonl:2: "image" lists 17 images; at most 16 per example'),
    (["a.png", 3], r'data.jsonl:2: "image" item 2 is 3: each image must be a path string$'),
    (["a.png", None], r'data.jsonl:2: "image" item 2 is null: each image must be a path string$'),
    ({"a": 1}, r'data.jsonl:2: each line needs string fields "image", "prefix" and "suffix" \("image" may be a '),
])
def test_a_bad_list_of_images_is_one_line_naming_it(tmp_path, image, message):
    f = write_rows(tmp_path, [("a.png", "caption en", "x"), (image, "caption en", "x")])
    with pytest.raises(ConfigError, match=message) as e:
        read_jsonl(f)
    assert "\n" not in str(e.value)


def test_markers_that_do_not_count_the_images_name_the_line(pg1, tmp_path):
    proc = palitorch.load(pg1[0]).processor
    write_images(tmp_path, ["a.png", "b.png"])
    ok = [(["a.png", "b.png"], "<image><image>caption en", "x"), (["a.png", "b.png"], "caption en", "x")]
    data = Dataset(read_jsonl(write_rows(tmp_path, ok)), proc, Images(proc.image_size))
    assert data.encoded[0] is data.encoded[1]  # the markers the file gives are those the pipeline adds
    assert data.lengths[0] - len(proc.encode("caption en", "x").ids) == proc.num_image_tokens  # one image more
    bad = ok + [(["a.png", "b.png"], "<image><image><image>caption en", "x")]
    with pytest.raises(ConfigError, match=r"data.jsonl:3: a prompt starts with 3 <image> markers for 2 images"):
        Dataset(read_jsonl(write_rows(tmp_path, bad)), proc, Images(proc.image_size))
    missing = [(["a.png", "nope.png"], "caption en", "x")]
    with pytest.raises(ConfigError, match=r"data.jsonl:1: image '.*nope.png' does not exist$"):
        Dataset(read_jsonl(write_rows(tmp_path, missing)), proc, Images(proc.image_size))


def pairs_data(folder):
    """trainkit's data, with an example about two images per pair of training images, and one in the eval set."""
    make_data(folder)
    for split, n in (("train", 24), ("test", 8)):
        lines = (folder / f"{split}.jsonl").read_text().splitlines()
        pairs = [{"image": [f"img/{split}{i}.png", f"img/{split}{i + 1}.png"], "prefix": "answer en which two?",
                  "suffix": f"{i} and {i + 1}", "task": "pair"} for i in range(0, n, 2)]
        (folder / f"{split}.jsonl").write_text("".join(x + "\n" for x in lines + [json.dumps(p) for p in pairs]))
    return folder


OVER = {"train__steps": 4, "checkpoint__every": 2, "checkpoint__keep": 3, "eval__max_examples": 8,
        "eval__final_max_examples": 0, "eval__every": 2, "data__per_image": 2}


def test_a_short_run_on_pairs_trains_evaluates_and_resumes(tmp_path):
    data = pairs_data(tmp_path / "data")
    whole = Trainer(config(data, tmp_path / "whole", **OVER))
    assert any(isinstance(e.image, tuple) for e in whole.data.examples)
    whole.fit()
    metrics = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    final = [m["eval"] for m in metrics if m.get("final")][-1]
    assert final["task"]["pair"]["n"] == 4 and "boxes" not in final  # every eval pair answered
    half = Trainer(config(data, tmp_path / "half", **{**OVER, "train__steps": 2}))
    half.fit()
    resumed = Trainer(config(data, tmp_path / "half", **OVER), resume=True)
    assert resumed.step == 2
    resumed.fit()
    want, got = losses(tmp_path / "whole"), losses(tmp_path / "half")
    assert set(want) == {1, 2, 3, 4} and got == pytest.approx(want, abs=1e-6)


def test_warmstart_refuses_a_list_of_images_in_one_line(tmp_path):
    data = pairs_data(tmp_path / "data")
    with pytest.raises(ConfigError, match=r'train.jsonl:49: "image" is a list: \[warmstart\] takes one image per '
                                          r"example; set \[warmstart\] epochs = 0"):
        Trainer(config(data, tmp_path / "run", warmstart__epochs=1, warmstart__prefix="caption en"))


@pytest.mark.parametrize("cache", [True, False])
def test_an_unreadable_image_of_a_list_stops_the_run_at_startup_naming_its_lines(tmp_path, cache):
    data = pairs_data(tmp_path / "data")
    (data / "img" / "train5.png").write_bytes(b"not an image")  # lines 11 and 12, and the pair [4, 5] on line 51
    with pytest.raises(ImageError, match=r"^\S+train\.jsonl:11, \S+train\.jsonl:12, \S+train\.jsonl:51: cannot read "
                                         r"image .*train5\.png") as e:
        Trainer(config(data, tmp_path / "run", **OVER, data__cache_images=cache))
    assert "\n" not in str(e.value)
    # An image that only the second place of an eval example's list names (the final evaluation takes them all)
    (data / "img" / "train5.png").write_bytes((data / "img" / "train4.png").read_bytes())
    (data / "img" / "only.png").write_bytes(b"not an image")
    with open(data / "test.jsonl", "a") as f:
        f.write(json.dumps({"image": ["img/test0.png", "img/only.png"], "prefix": "caption en", "suffix": "x"}) + "\n")
    with pytest.raises(ImageError, match=r"^\S+test\.jsonl:21: cannot read image .*only\.png"):
        Trainer(config(data, tmp_path / "run2", **OVER, data__cache_images=cache))


def test_periodic_evaluation_answers_a_list_as_the_pipeline(ckpt_factory, tmp_path):
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    write_images(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    examples = read_jsonl(write_rows(tmp_path, ROWS))
    rows = [[Image.open(p) for p in e.image] if isinstance(e.image, tuple) else Image.open(e.image) for e in examples]
    answers = [r.text for r in pipe.generate(rows, [e.prefix for e in examples], max_new_tokens=6)]
    assert len(set(answers)) > 1, "the rows' answers should differ"
    for e, a in zip(examples, answers):
        e.suffix = a
    m = exact_match(pipe.model, pipe.processor, examples, [0, 1, 2, 3], 2, 6, [], ddp.Dist())
    assert m["exact_match"] == 1.0 and m["n"] == 4
    examples[3].suffix = examples[1].suffix = "<loc0010><loc0020><loc0500><loc0600> cat"  # a box: ROWS[3]'s counts
    m = exact_match(pipe.model, pipe.processor, examples, [0, 1, 2, 3], 4, 6, [], ddp.Dist())
    assert m["boxes"]["n"] == 2  # rows 1 and 3 are about one image each
    examples[3].image = (examples[3].image[0], examples[3].image[0])  # two images: its boxes are in neither
    m = exact_match(pipe.model, pipe.processor, examples, [0, 1, 2, 3], 4, 6, [], ddp.Dist())
    assert m["boxes"]["n"] == 1
