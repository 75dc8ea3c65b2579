"""The generation engine against transformers' `generate`, batching, EOS, stop strings and errors
(streamed pieces: test_stream_bytes.py).

Tolerances: greedy tokens must be equal; logprobs within 3e-4 of transformers' and of a float64 reference
(`DIVERSE_LOGPROB_TOL`: float32 on CPU, same weights, chaotic on purpose; see hf_factory), or 1e-4 between two
palitorch runs.
"""


import numpy as np
import pytest
import torch
from PIL import Image

import palitorch
from palitorch.errors import InputError
from palitorch.inference import generate as engine

from hf_factory import DIVERSE_LOGPROB_TOL, diverse, hf_generate

STEPS = 32
PROMPTS = ["caption en", "answer en what color is the shape?", "detect cat ; dog"]
SUFFIXES = ["a cat on a mat", "red", "<loc0010><loc0020><loc0500><loc0600> cat"]


def images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def float64_logprobs(folder, hf, imgs, prompts, toks):
    """The logprobs of given answers `toks` [B, n] under a float64 copy of transformers' model (one forward over the
    prompts and answers, left-padded as in `hf_generate`): float32 rounding's reference, for a test to tell how far
    from exact arithmetic each implementation is."""
    import copy

    from hf_factory import hf_processor

    proc = hf_processor(folder)
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
    t = inputs["input_ids"].shape[1]
    exact = copy.deepcopy(hf).double()
    with torch.no_grad():
        logits = exact(input_ids=torch.cat([inputs["input_ids"], toks], 1),
                       pixel_values=inputs["pixel_values"].double(),
                       attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(toks)], 1),
                       token_type_ids=torch.cat([inputs["token_type_ids"], torch.ones_like(toks)], 1)).logits
    return torch.log_softmax(logits[:, t - 1:-1], -1).gather(-1, toks[..., None])[..., 0]


@pytest.mark.parametrize("version,size", [(1, 224), (1, 448), (2, 224), (2, 448)])
def test_greedy_matches_transformers(ckpt_factory, version, size):
    folder, hf = diverse(ckpt_factory, version, size)
    pipe = palitorch.load(folder)
    imgs = images(3)
    # A single input, then a left-padded batch (at 448 only the batch, which holds 1024 image tokens a row).
    cases = ((imgs[:1], PROMPTS[:1]), (imgs, PROMPTS)) if size == 224 else ((imgs[:2], PROMPTS[1:]),)
    for ims, prompts in cases:
        ref_toks, ref_lp = hf_generate(folder, hf, ims, prompts, max_new_tokens=STEPS, min_new_tokens=STEPS)
        ours = pipe.generate(ims, prompts, max_new_tokens=STEPS, min_new_tokens=STEPS)
        exact = float64_logprobs(folder, hf, ims, prompts, ref_toks)
        for r, t, lp, x in zip(ours, ref_toks, ref_lp, exact):
            assert r.finish_reason == "length"
            assert r.token_ids == t.tolist()
            torch.testing.assert_close(torch.tensor(r.logprobs), lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)
            torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.float64), x, atol=DIVERSE_LOGPROB_TOL,
                                       rtol=0)
    assert len({t for r in ours for t in r.token_ids}) > 3, "the model should not just repeat one token"
    assert len({r.prompt_tokens for r in ours}) == len(ours), "the prompts differ in length, so the batch is padded"


def test_batched_equals_one_at_a_time(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    imgs = images(4, seed=1)
    prompts = [*PROMPTS, "ocr"]
    batch = pipe.generate(imgs, prompts, max_new_tokens=20)
    for im, p, b in zip(imgs, prompts, batch):
        one = pipe.generate(im, p, max_new_tokens=20)
        assert one.token_ids == b.token_ids and one.text == b.text and one.finish_reason == b.finish_reason
        torch.testing.assert_close(torch.tensor(one.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def test_one_prompt_goes_with_every_image_and_lists_must_match(ckpt_factory):
    """generate(images, prompt) asks the prompt of each image, as a batch; score broadcasts a single prefix or
    suffix the same way. Lists of different lengths, or empty ones, are one-line input errors."""
    folder, _ = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    imgs = images(3, seed=2)
    assert pipe.generate(imgs, "caption en", max_new_tokens=6) == pipe.generate(imgs, ["caption en"] * 3,
                                                                                 max_new_tokens=6)
    scored = pipe.score(imgs[0], ["caption en", "answer en what?"], "a cat")
    assert scored == pipe.score([imgs[0]] * 2, ["caption en", "answer en what?"], ["a cat"] * 2)
    with pytest.raises(InputError, match=r"same length, got lengths \[2, 3\]"):
        pipe.generate(imgs, ["caption en"] * 2)
    with pytest.raises(InputError, match="empty batch"):
        pipe.generate([], "caption en")


def test_an_image_shared_by_several_prompts_is_encoded_once(ckpt_factory, tmp_path):
    """One image with a list of prompts (or the same object or path given again) is preprocessed and run through
    the vision tower once; the answers are those of a batch of separate copies, and of transformers."""
    folder, hf = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    pipe.feature_cache.resize(0)  # within a call only (tests/inference/test_feature_cache.py: across calls)
    a, b = images(2, seed=3)
    b.save(tmp_path / "b.png")
    seen = []
    hook = pipe.model.vision_tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        shared = pipe.generate([a, str(tmp_path / "b.png"), a, tmp_path / "b.png"], [*PROMPTS, "ocr"],
                               max_new_tokens=12, min_new_tokens=12)
        assert seen == [2]
        copies = [a, Image.open(tmp_path / "b.png"), a.copy(), Image.open(tmp_path / "b.png")]
        apart = pipe.generate(copies, [*PROMPTS, "ocr"], max_new_tokens=12, min_new_tokens=12)
        assert seen == [2, 4]
        one_image = pipe.generate(a, PROMPTS, max_new_tokens=12, min_new_tokens=12)
        assert seen == [2, 4, 1]
        scores = pipe.score(a, PROMPTS, SUFFIXES)
        assert seen == [2, 4, 1, 1]
        beams = pipe.generate(a, PROMPTS, max_new_tokens=6, num_beams=2)
        assert seen == [2, 4, 1, 1, 1]
    finally:
        hook.remove()
    for x, y in zip(shared, apart):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    ref_toks, ref_lp = hf_generate(folder, hf, [a] * 3, PROMPTS, max_new_tokens=12, min_new_tokens=12)
    for r, t, lp in zip(one_image, ref_toks, ref_lp):
        assert r.token_ids == t.tolist()
        torch.testing.assert_close(torch.tensor(r.logprobs), lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)
    for x, y in zip(beams, pipe.generate([a.copy() for _ in PROMPTS], PROMPTS, max_new_tokens=6, num_beams=2)):
        assert x.token_ids == y.token_ids
    for p, suffix, sc in zip(PROMPTS, SUFFIXES, scores):
        alone = pipe.score(a.copy(), p, suffix)
        assert alone.token_ids == sc.token_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(sc.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", [0, 1])
def test_stops_on_each_eos_id(ckpt_factory, which):
    """PaliGemma 2 lists two EOS ids: either one ends the answer, which then excludes it."""
    folder, _ = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    img = images(1)[0]
    free = pipe.generate(img, "caption en", max_new_tokens=STEPS, min_new_tokens=STEPS)
    eos = free.token_ids[6]
    cut = free.token_ids.index(eos)
    ids = (eos, pipe.processor.eos_id)[:: 1 if which == 0 else -1]
    pipe.model.cfg = pipe.model.cfg.replace(eos_token_ids=ids)
    r = pipe.generate(img, "caption en", max_new_tokens=STEPS)
    assert r.finish_reason == "eos"
    assert r.token_ids == free.token_ids[:cut]
    assert r.logprobs == pytest.approx(free.logprobs[:cut], abs=1e-5)
    assert r.text == pipe.processor.decode(free.token_ids[:cut])
    # min_new_tokens suppresses the EOS until then.
    late = pipe.generate(img, "caption en", max_new_tokens=STEPS, min_new_tokens=cut + 1)
    assert len(late.token_ids) > cut


def test_eos_in_one_row_does_not_stop_the_batch(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    imgs = images(2)
    free = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=16, min_new_tokens=16)
    eos = next(t for t in free[0].token_ids[2:] if t not in free[1].token_ids)
    pipe.model.cfg = pipe.model.cfg.replace(eos_token_ids=(eos,))
    a, b = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=16)
    assert a.finish_reason == "eos" and len(a.token_ids) < 16
    assert b.finish_reason == "length" and b.token_ids == free[1].token_ids


def test_stop_strings(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    img = images(1)[0]
    free = pipe.generate(img, "caption en", max_new_tokens=24, min_new_tokens=24)
    stop = free.text[8:11]
    cut = free.text.find(stop)
    r = pipe.generate(img, "caption en", max_new_tokens=24, min_new_tokens=24, stop=["never appears", stop])
    assert r.finish_reason == "stop"
    assert r.text == free.text[:cut]
    assert free.token_ids[: len(r.token_ids)] == r.token_ids and len(r.token_ids) < 24
    assert pipe.processor.decode(r.token_ids).find(stop) >= cut  # the last token completed the stop string
    s = pipe.stream(img, "caption en", max_new_tokens=24, min_new_tokens=24, stop=[stop])
    assert "".join(s) == r.text and s.result.finish_reason == "stop"


@pytest.mark.parametrize("stop", ["\U0001f600", "b\U0001f600", "\u2713", "d \u2713"])
def test_a_stop_string_ending_in_a_multibyte_character(ckpt_factory, monkeypatch, stop):
    """A 4- or 3-byte character arrives as byte-fallback tokens (one U+FFFD per byte until it completes): the stop
    string is still found at the token that completes it, also when the answer ends there."""
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    text = "ab\U0001f600cd \u2713 fin"
    ids = pipe.processor.tokenizer.encode(text, add_special_tokens=False).ids

    def scripted(model, prompts, opts, eos, pad_id, steps, step=None):
        for i in ids[:steps]:
            yield torch.tensor([i]), torch.tensor([-1.0]), None

    monkeypatch.setattr(engine, "decode", scripted)
    last = next(n for n in range(1, len(ids) + 1) if stop in pipe.processor.decode(ids[:n]))
    want = text[:text.index(stop)]
    for budget in (len(ids), last):  # the answer goes on, or ends with the stop string's last byte
        r = pipe.generate(images(1)[0], "caption en", max_new_tokens=budget, stop=[stop])
        assert (r.text, r.finish_reason, r.token_ids) == (want, "stop", ids[:last])
        s = pipe.stream(images(1)[0], "caption en", max_new_tokens=budget, stop=[stop])
        assert "".join(s) == s.result.text == want


def test_seeded_sampling_is_reproducible(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    img = images(1)[0]
    kw = {"max_new_tokens": 16, "temperature": 1.5, "top_k": 50}
    a = pipe.generate(img, "caption en", seed=3, **kw)
    b = pipe.generate(img, "caption en", seed=3, **kw)
    c = pipe.generate(img, "caption en", seed=4, **kw)
    greedy = pipe.generate(img, "caption en", max_new_tokens=16)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids and a.token_ids != greedy.token_ids


def test_seeded_batches_draw_different_samples(ckpt_factory):
    """n samples of one input as `[img] * n` with a seed and a batch_size: each batch draws its own random numbers
    (every batch began from the same seed, so batch_size=1 gave n copies of one sample)."""
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    kw = {"max_new_tokens": 12, "temperature": 1.5, "seed": 7}
    one_batch = pipe.generate(images(1) * 4, "caption en", **kw)
    assert len({tuple(r.token_ids) for r in one_batch}) == 4
    for size in (1, 2, 3):
        samples = [tuple(r.token_ids) for r in pipe.generate(images(1) * 4, "caption en", batch_size=size, **kw)]
        assert len(set(samples)) == 4, size
        again = [tuple(r.token_ids) for r in pipe.generate(images(1) * 4, "caption en", batch_size=size, **kw)]
        assert again == samples  # still reproducible


def test_repetition_penalty_matches_transformers(ckpt_factory):
    folder, hf = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    imgs = images(2)
    ref, ref_lp = hf_generate(folder, hf, imgs, PROMPTS[:2], max_new_tokens=16, min_new_tokens=16,
                              repetition_penalty=1.8)
    plain = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=16, min_new_tokens=16)
    ours = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=16, min_new_tokens=16, repetition_penalty=1.8)
    assert [r.token_ids for r in ours] == ref.tolist()
    assert [r.token_ids for r in ours] != [r.token_ids for r in plain]
    torch.testing.assert_close(torch.tensor([r.logprobs for r in ours]), ref_lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)


def test_cache_is_reused_and_scoring_still_works(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    img = images(1)[0]
    before = pipe.score(img, "caption en", "a cat")
    a = pipe.generate(img, "caption en", max_new_tokens=8)
    cache = pipe.model.language_model.layers[0].attn.kv_cache.k
    b = pipe.generate(img, "answer en what color is the shape?", max_new_tokens=10)
    assert pipe.model.language_model.layers[0].attn.kv_cache.k is cache
    assert pipe.generate(img, "caption en", max_new_tokens=8) == a
    assert b.token_ids
    assert pipe.score(img, "caption en", "a cat").logprobs == pytest.approx(before.logprobs, abs=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_a_prefill_reads_only_the_slots_it_writes(ckpt_factory, version):
    """A prefill attends over the cache's first T slots, the prompt's, not over the whole cache: what the slots past
    them hold (here NaN, as left by nothing in particular) cannot reach its logits, which equal those of a prefill
    into a cache of exactly T slots; a cache of T + 100 slots is reused as it is."""
    folder, _ = diverse(ckpt_factory, version)
    pipe = palitorch.load(folder)
    model = pipe.model
    pixels, _ = pipe._pixels(images(2))
    prompts = engine.encode_prompts(model, pipe.processor, pixels, PROMPTS[:2])
    t = prompts.ids.shape[1]
    with torch.inference_mode():
        model.setup_caches(2, t)
        exact, _ = engine.prefill(model, prompts, t)
        model.setup_caches(2, t + 100)
        for layer in model.language_model.layers:
            layer.attn.kv_cache.k[:, :, t:] = float("nan")
            layer.attn.kv_cache.v[:, :, t:] = float("nan")
        longer, cur = engine.prefill(model, prompts, t + 100)
    assert cur.valid.shape == (2, t + 100)
    torch.testing.assert_close(longer, exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw,words", [
    ({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"top_k": 0}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"num_beams": 0}, "num_beams"),
    ({"tempreature": 1}, "unknown decoding option"), ({"stop": [""]}, "stop"),
])
def test_bad_options_raise_one_line_input_errors(ckpt_factory, kw, words):
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    with pytest.raises(InputError, match=words) as e:
        pipe.generate(images(1)[0], "caption en", **kw)
    assert "\n" not in str(e.value)


def test_prompt_longer_than_the_context_is_an_input_error(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    context = pipe.cfg.text.max_position_embeddings
    with pytest.raises(InputError, match="context") as e:
        pipe.generate(images(1)[0], "caption en " * context)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError):
        list(pipe.stream(images(1)[0], "caption en " * context))


def windowed(ckpt_factory, tmp_path, window: int = 100):
    """The Gemma 2 `diverse` checkpoint with a sliding window shorter than the sequence -> (folder, the original)."""
    import json
    import shutil

    src, _ = diverse(ckpt_factory, 2)
    folder = tmp_path / "windowed"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["sliding_window"] = window
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, src


def test_sliding_window_matches_transformers(ckpt_factory, tmp_path):
    """Gemma 2's sliding layers, with a window (100) shorter than the sequence, so that it changes the answer."""
    from transformers import PaliGemmaForConditionalGeneration

    folder, src = windowed(ckpt_factory, tmp_path)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder).eval()
    pipe = palitorch.load(folder)
    imgs = images(2)
    ref, ref_lp = hf_generate(folder, hf, imgs, PROMPTS[:2], max_new_tokens=16, min_new_tokens=16)
    ours = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=16, min_new_tokens=16)
    assert [r.token_ids for r in ours] == ref.tolist()
    torch.testing.assert_close(torch.tensor([r.logprobs for r in ours]), ref_lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)
    unwindowed = palitorch.load(src).generate(imgs, PROMPTS[:2], max_new_tokens=16, min_new_tokens=16)
    assert max(abs(a - b) for r, u in zip(ours, unwindowed) for a, b in zip(r.logprobs, u.logprobs)) > 0.01


def test_a_suspended_stream_owns_the_caches(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    img = images(1)[0]
    unused = pipe.stream(img, "caption en", max_new_tokens=8)  # never iterated: holds nothing
    expected = pipe.generate(img, "caption en", max_new_tokens=8)
    s = iter(pipe.stream(img, "caption en", max_new_tokens=8))
    first = next(s)
    with pytest.raises(InputError, match="stream"):
        pipe.generate(img, "caption en", max_new_tokens=8)
    assert first + "".join(s) == expected.text
    assert pipe.generate(img, "caption en", max_new_tokens=8) == expected
    assert "".join(unused) == expected.text


def test_nan_weights_are_an_error_not_an_answer(ckpt_factory):
    """Damaged (NaN) weights gave an empty answer that looked like a real one; now generation, beams, streaming
    and scoring stop with a one-line NumericsError."""
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    with torch.no_grad():
        pipe.model.language_model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    img = images(1)[0]
    for call in (lambda: pipe.generate(img, "caption en"), lambda: pipe.generate(img, "caption en", num_beams=2),
                 lambda: "".join(pipe.stream(img, "caption en")), lambda: pipe.score(img, "caption en", "a cat")):
        with pytest.raises(palitorch.NumericsError, match="NaN or infinite logits") as e:
            call()
        assert "\n" not in str(e.value)
