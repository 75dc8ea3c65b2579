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


def cached_for(trainer, steps) -> set:
    """The images of this process's shares of `steps` (each from the data of its step) and of the evaluations."""
    t, e = trainer.cfg.train, trainer.cfg.eval
    used = set()
    for s in steps:
        d = trainer.data_at(s)
        used |= {d.examples[i].image for i in global_batch(len(d), t.batch_size, t.seed, s, d.order)}
    sizes = [e.final_max_examples] + ([e.max_examples] if trainer.periodic_evals() else [])
    ex = trainer.eval_examples
    return used | {ex[i].image for k in sizes for i in subset(len(ex), k, t.seed)}


def test_the_cache_follows_the_late_mix_and_the_periodic_evaluations(data, tmp_path):
    """From late_from on the steps draw from the late mix: its batches' images are cached, not those the first mix
    would have drawn; the periodic evaluations' (more than the final one's here) are cached too."""
    over = {**OVER, "data__late_from": 2, "data__late_task_repeat": "{vqa = 0}", "eval__every": 2,
            "eval__max_examples": 7, "eval__final_max_examples": 2}
    trainer = Trainer(config(data, tmp_path / "run", **over))
    assert trainer.data_at(3) is trainer.late_data and trainer.periodic_evals()
    assert set(trainer.images._store) == cached_for(trainer, range(4))


def test_a_resumed_run_caches_the_images_of_its_remaining_steps(data, tmp_path):
    """A resume from step 2 (past late_from 1) reads steps 2..3 of the late mix: not the steps already trained."""
    over = {**OVER, "data__late_from": 1, "data__late_task_repeat": "{vqa = 0}", "checkpoint__every": 2}
    Trainer(config(data, tmp_path / "run", **{**over, "train__steps": 2})).fit()
    trainer = Trainer(config(data, tmp_path / "run", **over), resume=True)
    assert trainer.step == 2
    assert set(trainer.images._store) == cached_for(trainer, range(2, 4))
    assert not cached_for(trainer, range(2)) <= set(trainer.images._store)  # (the test tells them apart)


def test_with_a_warm_start_every_training_image_is_cached(data, tmp_path):
    """The warm-start reads every image of the training data: all of them are decoded (and checked) before it."""
    trainer = Trainer(config(data, tmp_path / "run", **OVER, warmstart__epochs=1, warmstart__batch_size=8))
    assert {e.image for e in trainer.raw_train} <= set(trainer.images._store)
    assert len(cached_for(trainer, range(4))) < len(trainer.images._store)


def test_a_disabled_or_closed_read_ahead_reads_in_turn():
    """Ahead(enabled=False) reads each step on the caller's thread when asked; close() drops a read in progress,
    and a closed Ahead asked again reads that step itself and starts reading ahead once more."""
    from palitorch.train.feed import Ahead

    reads = []  # (thread, step)

    class Images:
        def batch(self, paths):
            reads.append((threading.current_thread().name, paths[0]))
            return torch.tensor(paths)

    here = threading.current_thread().name
    off = Ahead(Images(), lambda step: [[step]], enabled=False)
    assert [off.get(s, 10)[0].tolist() for s in range(3)] == [[0], [1], [2]]
    assert reads == [(here, 0), (here, 1), (here, 2)]
    ahead = Ahead(Images(), lambda step: [[step]])
    try:
        assert ahead.get(0, 10)[0].tolist() == [0]
        ahead.close()  # step 1's read, started by get(0), is dropped
        reads.clear()
        assert ahead.get(1, 10)[0].tolist() == [1] and (here, 1) in reads
        assert ahead.get(2, 10)[0].tolist() == [2]
        assert [name for name, step in reads if step == 2][0].startswith("palitorch-batches")  # read ahead again
    finally:
        ahead.close()


def test_one_more_line_is_counted_in_the_singular_and_three_are_all_named():
    images = Images(16)

    class E:
        def __init__(self, image, n):
            self.image, self.where = image, f"t.jsonl:{n}"

    images.register([E("x.png", n) for n in range(1, 5)] + [E("y.png", n) for n in range(5, 8)])
    assert images.used_by("x.png") == "t.jsonl:1, t.jsonl:2, t.jsonl:3 (and 1 more line): "
    assert images.used_by("y.png") == "t.jsonl:5, t.jsonl:6, t.jsonl:7: "


def test_without_the_cache_no_image_is_kept(data):
    """[data] cache_images = false: every read decodes the file again (a batch of several on threads, one alone),
    the same tensors the cache would hold."""
    paths = [data / "img" / f"train{i}.png" for i in range(3)]
    plain, cached = Images(16, cache=False), Images(16)
    got = plain.batch(paths)
    assert torch.equal(plain.get(paths[1]), got[1]) and torch.equal(plain.batch(paths[:1])[0], got[0])
    assert plain._store == {}
    assert torch.equal(cached.batch(paths), got) and list(cached._store) == paths


def test_preload_returns_the_first_unreadable_image_in_the_order_given(data, tmp_path):
    """preload keeps decoding on threads; it returns the first failure in `paths` order (the one every process
    then raises), with the images before it in the cache."""
    bad = damaged(data, tmp_path, "train7.png", "not an image")
    (bad / "img" / "train3.png").write_bytes(b"no image either")
    paths = [bad / "img" / f"train{i}.png" for i in range(10)]
    images = Images(16)
    assert images.preload(paths) == paths[3]
    assert set(paths[:3]) <= set(images._store) and paths[3] not in images._store
    fine = Images(16)
    assert fine.preload(paths[:3] + paths[4:7]) is None and len(fine._store) == 6


@pytest.mark.parametrize("cache", [True, False])
def test_of_two_unreadable_images_the_first_in_the_data_is_named(data, tmp_path, cache):
    """train2.png comes before train10.png in train.jsonl (though not in name order): it is the one named, whether
    the images are decoded into the cache or only their headers opened."""
    bad = damaged(data, tmp_path, "train10.png", "not an image")
    (bad / "img" / "train2.png").write_bytes(b"no image either")
    with pytest.raises(ImageError, match=r"train\.jsonl:5, \S+train\.jsonl:6: cannot read image .*train2\.png"):
        Trainer(config(bad, tmp_path / "run", **{**OVER, "train__steps": 30}, data__cache_images=cache))


def test_each_torchrun_process_caches_its_own_shares(data, tmp_path):
    """Under torchrun a process caches its share of each step's batch and its share of each evaluation (every
    world-th example of the subset), not the whole: here as process 0 and 1 of 2 would."""
    from palitorch.train import feed

    trainer = Trainer(config(data, tmp_path / "run", **OVER))
    d, ex = trainer.data, trainer.eval_examples
    for rank in range(2):
        trainer.dist = ddp.Dist(rank, 2)
        part = ddp.shard(8, trainer.dist)
        want = {d.examples[i].image for s in range(4) for i in global_batch(len(d), 8, 0, s, d.order)[part]}
        want |= {ex[i].image for i in subset(len(ex), 4, 0)[rank::2]}
        assert feed.wanted_images(trainer) == want, rank


def test_under_torchrun_every_process_raises_the_first_failure_of_any(data, tmp_path, monkeypatch):
    """read_images takes the minimum over the processes of each one's first unreadable image (its index in the
    data; the number of images for none): a process whose own images all read raises another's failure, and when
    none failed no process raises. The other process is played by the all-reduce."""
    from palitorch.train import feed

    bad = damaged(data, tmp_path, "train3.png", "not an image")
    images = Images(16)
    images.register(read_jsonl(bad / "train.jsonl"))
    paths = images.paths
    other = {"first": len(paths)}
    monkeypatch.setattr(ddp, "all_reduce_min", lambda t, d: torch.minimum(t, torch.tensor(other["first"])))
    two, cpu, mine = ddp.Dist(0, 2), torch.device("cpu"), set(paths[:3])
    feed.read_images(images, mine, two, cpu, False)  # neither process failed
    other["first"] = [p.name for p in paths].index("train3.png")
    with pytest.raises(ImageError, match=r"^\S+train\.jsonl:7, \S+train\.jsonl:8: cannot read image .*train3\.png"):
        feed.read_images(images, mine, two, cpu, False)
