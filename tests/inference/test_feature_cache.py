"""The cache of image features (palitorch/inference/features.py): an image seen lately skips the vision tower, and
everything a pipeline answers stays what it answers without the cache.

Tolerances: on the CPU a SigLIP row does not depend on its batch, so cached and fresh features are compared for
equality, and so are the answers (token ids and logprobs) with and without the cache. Against transformers (whose
processor encodes every image each time): greedy token ids equal, logprobs within hf_factory's DIVERSE_LOGPROB_TOL.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import palitorch
from palitorch.inference.features import DEFAULT_BYTES, FeatureCache

from hf_factory import DIVERSE_LOGPROB_TOL, diverse, hf_generate

ASSETS = sorted(str(p) for p in (Path(palitorch.__file__).parent / "assets").glob("easyvqa_test_*.png"))


def pictures(n: int, seed: int = 0, size: int = 40):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def pipe():
    return palitorch.load()


@pytest.fixture
def tower_calls(pipe, monkeypatch):
    """How many images each run of the vision tower took, in order."""
    calls = []
    tower = pipe.model.vision_tower
    original = type(tower).forward

    def counting(self, pixels):
        calls.append(pixels.shape[0])
        return original(self, pixels)

    monkeypatch.setattr(type(tower), "forward", counting)
    pipe.feature_cache.resize(DEFAULT_BYTES)
    pipe.feature_cache.clear()
    yield calls
    pipe.feature_cache.resize(DEFAULT_BYTES)
    pipe.feature_cache.clear()


def fresh(pipe, images):
    """The features of images, each encoded now, without the cache."""
    with torch.inference_mode():
        return pipe.model.embed_image(pipe.processor.normalize(pipe.processor.resized_batch(images)).to(pipe.dtype))


def answers(results):
    return [(r.token_ids, r.logprobs) for r in results]


def test_an_image_seen_again_skips_the_tower_with_the_same_answers(pipe, tower_calls):
    first = pipe.generate(ASSETS, "caption en")
    assert tower_calls == [len(ASSETS)] and pipe.feature_cache.misses == len(ASSETS)
    again = pipe.generate(ASSETS[::-1], "caption en")
    assert tower_calls == [len(ASSETS)] and pipe.feature_cache.hits == len(ASSETS)  # no second run
    assert answers(again[::-1]) == answers(first)
    pipe.feature_cache.resize(0)  # off: every image through the tower, the same answers
    assert answers(pipe.generate(ASSETS, "caption en")) == answers(first)
    assert tower_calls == [len(ASSETS)] * 2 and len(pipe.feature_cache) == 0


def test_a_mixed_batch_encodes_only_its_new_images_and_keeps_its_order(pipe, tower_calls):
    a, b, c, d = pictures(4)
    pipe.generate([a, b], "caption en", max_new_tokens=2)
    assert tower_calls == [2]
    # new, seen, new, seen, and a copy of c (another object, the same pixels): c and d once each
    batch = [c, a, d, b, c.copy()]
    pixels, index = pipe._pixels(batch)
    with torch.inference_mode():
        got = pixels.features()
    assert tower_calls == [2, 2] and index is None
    with torch.inference_mode():
        assert pipe._pixels(batch)[0].features().data_ptr() != got.data_ptr()  # (a new batch: all hits, anew)
    assert tower_calls == [2, 2]
    assert torch.equal(got, fresh(pipe, batch))
    one = got[0].numel() * got.element_size()
    for entry in pipe.feature_cache._entries.values():  # each its own memory, not a view of its batch's
        assert entry.untyped_storage().nbytes() == one
    want = pipe.generate(batch, "answer en what color is the shape?")
    pipe.feature_cache.resize(0)
    assert answers(pipe.generate(batch, "answer en what color is the shape?")) == answers(want)


def test_every_route_to_the_model_takes_the_cached_features(pipe, tower_calls):
    image = ASSETS[0]
    text = pipe.generate(image, "caption en").text
    assert tower_calls == [1]
    score = pipe.score(image, "caption en", text)
    streamed = "".join(pipe.stream(image, "caption en"))
    with pipe.live(max_rows=2) as live:
        live.admit([image], ["caption en"])
        ended = []
        while live.active:
            ended += [item for _, item in live.step() if not isinstance(item, str)]
    beams = pipe.generate(image, "caption en", num_beams=2)
    several = pipe.generate([[image, ASSETS[1]]], ["answer en are both red?"], max_new_tokens=3)
    assert tower_calls == [1, 1]  # only ASSETS[1], for the two-image prompt
    assert streamed == text == ended[0].text
    pipe.feature_cache.resize(0)
    assert pipe.score(image, "caption en", text).logprobs == score.logprobs
    assert answers([pipe.generate(image, "caption en", num_beams=2)]) == answers([beams])
    assert answers(pipe.generate([[image, ASSETS[1]]], ["answer en are both red?"], max_new_tokens=3)) == \
        answers(several)


def test_changed_vision_weights_do_not_reuse_old_features(pipe, tower_calls):
    image = pictures(1, seed=3)[0]
    before = pipe.generate(image, "caption en", max_new_tokens=4)
    weight = pipe.model.projector.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)  # as an optimizer step would change it: in place, its version counter moves
        changed = pipe.generate(image, "caption en", max_new_tokens=4)
        assert tower_calls == [1, 1]
        pipe.feature_cache.resize(0)
        assert answers([pipe.generate(image, "caption en", max_new_tokens=4)]) == answers([changed])
        assert changed.logprobs != before.logprobs
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_the_cache_holds_at_most_its_bytes_and_drops_the_least_recently_used(pipe, tower_calls):
    one = fresh(pipe, pictures(1))[0]
    size = one.numel() * one.element_size()
    pipe.feature_cache.resize(3 * size)
    a, b, c, d = pictures(4, seed=5)
    for im in (a, b, c):
        pipe.generate(im, "caption en", max_new_tokens=1)
    pipe.generate(a, "caption en", max_new_tokens=1)  # a is now the most recent: d pushes b out
    pipe.generate(d, "caption en", max_new_tokens=1)
    assert len(pipe.feature_cache) == 3 and pipe.feature_cache.bytes == 3 * size
    tower_calls.clear()
    for im in (a, c, d):
        pipe.generate(im, "caption en", max_new_tokens=1)
    assert tower_calls == []
    pipe.generate(b, "caption en", max_new_tokens=1)
    assert tower_calls == [1]
    pipe.feature_cache.resize(size - 1)  # too small for one image: nothing kept
    assert len(pipe.feature_cache) == 0
    pipe.generate(a, "caption en", max_new_tokens=1)
    assert len(pipe.feature_cache) == 0 and pipe.feature_cache.bytes == 0


def test_resize_refuses_what_is_not_a_byte_count():
    cache = FeatureCache()
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(palitorch.InputError, match="whole number of bytes"):
            cache.resize(bad)
    cache.resize(0)
    assert cache.max_bytes == 0 and "0 images" in repr(cache)


def test_answers_from_cached_features_match_transformers(ckpt_factory):
    """A checkpoint whose answers vary token to token: the second call (every image from the cache) against
    transformers, which encodes every image."""
    folder, hf = diverse(ckpt_factory, version=2)
    pipe = palitorch.load(folder)
    images, prompts = pictures(3, seed=9, size=50), ["caption en", "answer en what is this?", "detect cat"]
    pipe.generate(images, prompts, max_new_tokens=6)
    assert len(pipe.feature_cache) == 3
    ours = pipe.generate(images, prompts, max_new_tokens=6)
    assert pipe.feature_cache.hits == 3
    theirs_ids, theirs_lp = hf_generate(folder, hf, images, prompts, max_new_tokens=6)
    for r, ids, lp in zip(ours, theirs_ids, theirs_lp):
        assert len(r.token_ids) >= 3 and r.token_ids == ids.tolist()[:len(r.token_ids)]
        np.testing.assert_allclose(r.logprobs, lp.tolist()[:len(r.logprobs)], atol=DIVERSE_LOGPROB_TOL)
