"""Images read before step 1 (an unreadable one is a startup error naming its JSONL lines) and batches read one step
ahead on a thread (the same tensors, the same errors)."""

import json
import shutil
import threading

import pytest
import torch

from palitorch.errors import ConfigError
from palitorch.train import ddp
from palitorch.train.data import global_batch, read_jsonl, step_examples
from palitorch.train.evaluate import subset
from palitorch.train.images import ImageError, Images
from palitorch.train.loop import Trainer

from trainkit import config, losses, make_data

OVER = {"train__steps": 4, "eval__max_examples": 4, "eval__final_max_examples": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def damaged(data, tmp_path, image: str, how: str):
    """A copy of the data whose img/`image` is cut short (its header reads, its pixels do not) or not an image."""
    copy = shutil.copytree(data, tmp_path / "data")
    f = copy / "img" / image
    if how == "truncated":
        f.write_bytes(f.read_bytes()[:80])
    else:
        f.write_bytes(b"this is no image at all")
    return copy


def lines_of(data, image: str) -> list[str]:
    return [e.where for e in read_jsonl(data / "train.jsonl") if e.image.name == image]


@pytest.mark.parametrize("how", ["truncated", "not an image"])
def test_an_unreadable_image_stops_the_run_at_startup_naming_its_lines(data, tmp_path, how):
    bad = damaged(data, tmp_path, "train5.png", how)
    where = lines_of(bad, "train5.png")
    assert len(where) == 2
    with pytest.raises(ImageError) as e:  # before any step: the run is created and fails here
        Trainer(config(bad, tmp_path / "run", **{**OVER, "train__steps": 30}))
    assert str(e.value).startswith(f"{where[0]}, {where[1]}: cannot read image ")
    assert "\n" not in str(e.value) and "train5.png" in str(e.value)


def test_without_the_cache_headers_are_checked_at_startup_and_pixels_name_their_lines(data, tmp_path):
    bad = damaged(data, tmp_path, "train5.png", "not an image")
    with pytest.raises(ImageError, match=r"train\.jsonl:11, .*train\.jsonl:12: cannot read image .*not in a format"):
        Trainer(config(bad, tmp_path / "a", **OVER, data__cache_images=False))
    # A file whose header reads but whose pixels do not is met when its batch comes (read on the batch thread): the
    # same one-line error, naming the lines.
    cut = damaged(data, tmp_path / "b", "train5.png", "truncated")
    trainer = Trainer(config(cut, tmp_path / "b" / "run", **{**OVER, "train__steps": 30}, data__cache_images=False))
    with pytest.raises(ConfigError, match=r"^\S+train\.jsonl:11, \S+train\.jsonl:12: cannot read image "):
        trainer.fit()


def test_more_than_three_lines_are_counted():
    images = Images(16)

    class E:
        def __init__(self, n):
            self.image, self.where = "x.png", f"t.jsonl:{n}"

    images.register([E(n) for n in range(1, 6)])
    assert images.used_by("x.png") == "t.jsonl:1, t.jsonl:2, t.jsonl:3 (and 2 more lines): "
    assert images.used_by("y.png") == ""


def test_the_cache_holds_the_images_this_process_will_read(data, tmp_path):
    # 2 steps of 8 of the 48 examples: their images and the 4 evaluated ones, not the whole set.
    trainer = Trainer(config(data, tmp_path / "run", **{**OVER, "train__steps": 2, "eval__every": 0}))
    d, n = trainer.data, len(trainer.data)
    used = {d.examples[i].image for s in range(2) for i in global_batch(n, 8, 0, s, d.order)}
    evaluated = {trainer.eval_examples[i].image for i in subset(len(trainer.eval_examples), 4, 0)}
    assert set(trainer.images._store) == used | evaluated
    assert len(used) < len({e.image for e in d.examples})


@pytest.mark.parametrize("per_image", [1, 3])
def test_step_examples_are_the_shares_global_batch_gives(data, tmp_path, per_image):
    trainer = Trainer(config(data, tmp_path / "run", **OVER, data__per_image=per_image))
    d, n = trainer.data, len(trainer.data)
    for start, stop in [(0, 1), (2, 9), (5, 6), (0, 40)]:
        for rank in range(3):
            part = ddp.shard(8, ddp.Dist(rank, 3))
            want = sorted({i for s in range(start, stop) for i in global_batch(n, 8, 0, s, d.order)[part]})
            assert step_examples(d, 8, 0, start, stop, part) == want, (start, stop, rank)


def test_without_the_cache_images_are_read_a_step_ahead_on_a_thread(data, tmp_path):
    over = {**OVER, "train__steps": 7, "train__micro_batch_size": 3, "data__per_image": 2, "data__cache_images": False}
    trainer = Trainer(config(data, tmp_path / "run", **over))
    threads = []
    batch = trainer.images.batch

    def spy(paths):
        threads.append(threading.current_thread().name)
        return batch(paths)

    trainer.images.batch = spy
    for step in range(7):
        got = trainer.ahead.get(step, 7)
        want = [batch(trainer.data.paths(m)) for m in trainer.micro_batches(step)]
        assert len(got) == len(want) == 3
        assert all(torch.equal(a, b) for a, b in zip(got, want)), step
    trainer.ahead.close()
    assert threads[:3] == [threading.current_thread().name] * 3  # the first step has nothing to overlap with
    assert len(threads) == 3 * 7  # the last step starts no read beyond it
    assert all(name.startswith("palitorch-batches") for name in threads[3:])
    # With the cache every image is in memory before step 1: nothing to read ahead.
    assert not Trainer(config(data, tmp_path / "cached", **{**over, "data__cache_images": True})).ahead.enabled


def test_reading_ahead_changes_no_number(data, tmp_path):
    over = {**OVER, "train__steps": 5, "augment__contrast": 0.3, "train__micro_batch_size": 4,
            "data__cache_images": False}

    class InTurn(Trainer):
        prefetch = False

    Trainer(config(data, tmp_path / "ahead", **over)).fit()
    InTurn(config(data, tmp_path / "turn", **over)).fit()
    assert losses(tmp_path / "ahead") == losses(tmp_path / "turn")  # exactly
    rows = [json.loads(r) for r in (tmp_path / "ahead" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["final"]
