"""Prompts about several images on cases test_multi_image does not draw, against transformers' processor and model
with nested images (`images=[[a, b], [c]]`): PaliGemma 2 at 448 px whose Gemma 2 sliding window is shorter than a
prompt of two images (greedy tokens and logprobs, top_logprobs, beam search), one image object given twice in a row
and across rows, scores of batches mixing 1 and 3 images, prompts carrying their own markers, live batches that
multi-image sequences join while others decode, batch_size and a compiled (padded) pipeline, and the one-line errors
of every entry point.

Tolerances: logprobs within DIVERSE_LOGPROB_TOL (hf_factory), token ids exactly.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import palitorch
from palitorch.errors import InputError

from hf_factory import DIVERSE_LOGPROB_TOL, diverse, diverse_weights, hf_processor, hf_suffix_logprobs

STEPS = 6
KW = dict(max_new_tokens=STEPS, min_new_tokens=STEPS)


def images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 9 * i, 44 + 5 * i, 3), dtype=np.uint8)) for i in range(n)]


def nested(rows):
    """Our rows (an image, or a list of images) -> transformers' nested lists."""
    return [list(r) if isinstance(r, (list, tuple)) else [r] for r in rows]


def hf_inputs(folder, rows, prompts):
    proc = hf_processor(folder)
    proc.tokenizer.padding_side = "left"
    return proc(images=nested(rows), text=prompts, return_tensors="pt", padding=True)


def hf_greedy(folder, hf, rows, prompts, top: int = 0):
    """transformers' greedy tokens [B, n], their logprobs [B, n] and the top `top` ids at each step [B, n, top]."""
    inputs = hf_inputs(folder, rows, prompts)
    out = hf.generate(**inputs, do_sample=False, output_logits=True, return_dict_in_generate=True, **KW)
    toks = out.sequences[:, inputs["input_ids"].shape[1]:]
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    return toks, logp.gather(-1, toks[..., None])[..., 0], logp.topk(max(top, 1), -1).indices


@pytest.fixture(scope="module")
def windowed(ckpt_factory):
    """PaliGemma 2 at 448 px (patches of 56: 64 tokens an image, to stay fast) whose sliding window (100) is shorter
    than a prompt about two images (~140 tokens), so the window cuts into the images."""
    return ckpt_factory("multi-pg2-448-window", version=2, image_size=448, patch_size=56, kv_heads=2,
                        text_extra=dict(sliding_window=100), init=lambda m, s: diverse_weights(m, 2448))


ROWS_PROMPTS = ("answer en same?", "caption en", "answer en which?")


def three_rows(seed=0):
    a, b, c = images(3, seed)
    return [[a, b], c, [b, a, c]], list(ROWS_PROMPTS)


def test_pg2_448_window_shorter_than_the_images_greedy_top_and_beams_are_transformers(windowed):
    folder, hf = windowed
    pipe = palitorch.load(folder)
    rows, prompts = three_rows()
    inputs = hf_inputs(folder, rows, prompts)
    lengths = inputs["attention_mask"].sum(-1).tolist()
    assert hf.config.text_config.sliding_window < min(n for n, r in zip(lengths, rows) if isinstance(r, list))
    ref, ref_lp, ref_top = hf_greedy(folder, hf, rows, prompts, top=3)
    ours = pipe.generate(rows, prompts, top_logprobs=3, **KW)
    assert [r.prompt_tokens for r in ours] == lengths
    for r, t, lp, top in zip(ours, ref, ref_lp, ref_top):
        assert r.token_ids == t.tolist()
        torch.testing.assert_close(torch.tensor(r.logprobs), lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)
        assert [[i for i, _ in alt] for alt in r.top_logprobs] == top.tolist()
    assert len({tuple(r.token_ids) for r in ours}) == 3, "the rows' answers should differ"
    out = hf.generate(**inputs, do_sample=False, num_beams=3, max_new_tokens=STEPS, early_stopping=True)
    want = [[t for t in row if t != hf.config.pad_token_id] for row in out[:, inputs["input_ids"].shape[1]:].tolist()]
    assert [r.token_ids for r in pipe.generate(rows, prompts, num_beams=3, max_new_tokens=STEPS)] == want


def test_live_batch_that_multi_image_rows_join_while_another_decodes(windowed):
    """Sequences about 2 images and 1 image join a live batch where one about 3 images is decoding: each answers as
    generate does, the sliding window and all."""
    folder, _ = windowed
    pipe = palitorch.load(folder)
    rows, prompts = three_rows()
    want = [r.token_ids for r in pipe.generate(rows, prompts, **KW)]
    done = {}
    with pipe.live(max_rows=4, **KW) as live:
        first, _ = live.admit([rows[2]], [prompts[2]])
        done.update((id(q), r) for q, r in live.step() if not isinstance(r, str))
        joined, _ = live.admit(rows[:2], prompts[:2])
        assert first[0] in live.active and len(live.active) == 3
        while live.active:
            done.update((id(q), r) for q, r in live.step() if not isinstance(r, str))
    assert [done[id(q)].token_ids for q in [*joined, *first]] == want


def test_batch_size_and_a_compiled_padded_pipeline_give_the_batch_answers(windowed):
    """batch_size= splits rows of several images without moving their images; a compiled pipeline pads a greedy
    batch with copies of its last row (here a list of images): the answers do not change."""
    folder, _ = windowed
    pipe = palitorch.load(folder)
    (ab, c, bac), prompts = three_rows()
    rows, prompts = [ab, c, bac, [c, c], ab[0]], [*prompts, "caption es", "caption en"]
    want = [r.token_ids for r in pipe.generate(rows, prompts, **KW)]
    for size in (1, 2, 3):
        assert [r.token_ids for r in pipe.generate(rows, prompts, batch_size=size, **KW)] == want
    pipe.compile()
    assert [r.token_ids for r in pipe.generate(rows[:3], prompts[:3], **KW)] == want[:3]
    assert [r.token_ids for r in pipe.generate(rows[1:3], prompts[1:3], **KW)] == want[1:3]  # padded to 3
    events = pipe.stream_batch(rows[:2], prompts[:2], **KW)  # padded to 3 as well
    assert [r.token_ids for _, r in sorted(e for e in events if not isinstance(e[1], str))] == want[:2]


def test_one_image_twice_in_a_row_and_across_rows_answers_as_copies_and_transformers(ckpt_factory):
    """The vision tower encodes an image object once however often it is given (in a row, across rows): the answers
    are those of distinct copies, and transformers'."""
    folder, hf = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    a, b = images(2, seed=4)
    prompts = ["answer en same?", "answer en which?", "caption en"]
    shared = pipe.generate([[a, a], [a, b], a], prompts, **KW)
    copies = pipe.generate([[a.copy(), a.copy()], [a.copy(), b], a.copy()], prompts, **KW)
    ref, ref_lp, _ = hf_greedy(folder, hf, [[a, a], [a, b], a], prompts)
    assert [r.token_ids for r in shared] == [r.token_ids for r in copies] == ref.tolist()
    for r, lp in zip(shared, ref_lp):
        torch.testing.assert_close(torch.tensor(r.logprobs), lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)
    assert "".join(pipe.stream([a, a], prompts[0], **KW)) == shared[0].text


def test_scores_of_a_batch_mixing_one_and_three_images_are_transformers(ckpt_factory):
    folder, hf = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    a, b, c = images(3, seed=5)
    rows = [a, [a, b, c], [c], [b, c]]
    prefixes, suffixes = ["caption en", "answer en which?", "caption en", "<image><image>answer en same?"], \
        ["a cat", "no", "dog", "yes it is"]
    proc = hf_processor(folder)
    for size in (None, 3):
        for row, prefix, suffix, r in zip(rows, prefixes, suffixes, pipe.score(rows, prefixes, suffixes, size)):
            ids, ref = hf_suffix_logprobs(proc, hf, row if isinstance(row, list) else [row], prefix, suffix)
            assert r.token_ids == ids
            torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=DIVERSE_LOGPROB_TOL, rtol=0)


def test_float16_rows_of_several_images_are_transformers_float16(ckpt_factory):
    """A left-padded float16 batch mixing 2, 1 and 3 images: transformers' float16 greedy tokens, logprobs within
    test_half_precision's float16 tolerance (both round every product to float16, in different orders)."""
    from transformers import PaliGemmaForConditionalGeneration

    folder, _ = diverse(ckpt_factory, 1)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float16).eval()
    rows, prompts = three_rows()
    ref, ref_lp, _ = hf_greedy(folder, hf, rows, prompts)
    for r, t, lp in zip(palitorch.load(folder, dtype="float16").generate(rows, prompts, **KW), ref, ref_lp):
        assert r.token_ids == t.tolist()
        torch.testing.assert_close(torch.tensor(r.logprobs), lp, atol=0.01, rtol=0)


@pytest.mark.parametrize("prompt", ["<image><image> answer en same?", "<image><image>\nanswer en same?"])
def test_markers_followed_by_a_space_or_newline_are_transformers(ckpt_factory, prompt):
    """What follows a prompt's own markers is its text, a leading space or newline included, as in transformers."""
    folder, hf = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    row = images(2, seed=6)
    inputs = hf_inputs(folder, [row], [prompt])
    assert pipe.processor.encode(prompt).ids == inputs["input_ids"][0].tolist()
    ref, _, _ = hf_greedy(folder, hf, [row], [prompt])
    assert pipe.generate([row], [prompt], **KW)[0].token_ids == ref[0].tolist()


def entry_points(pipe):
    """Each entry point taking (rows of images, prompts)."""

    def live(rows, prompts):
        with pipe.live(max_rows=2, max_new_tokens=2) as batch:
            batch.admit(rows, prompts)

    return {
        "generate": lambda rows, prompts: pipe.generate(rows, prompts, max_new_tokens=2),
        "score": lambda rows, prompts: pipe.score(rows, prompts, ["x"] * len(prompts)),
        "stream": lambda rows, prompts: "".join(pipe.stream(rows[0], prompts[0], max_new_tokens=2)),
        "stream_batch": lambda rows, prompts: list(pipe.stream_batch(rows, prompts, max_new_tokens=2)),
        "live": live,
    }


def test_bad_rows_of_images_are_the_same_one_line_error_on_every_entry_point(pg1):
    pipe = palitorch.load(pg1[0])
    a, b = images(2, seed=7)
    cases = [
        ([[]], ["caption en"], "an input's list of images is empty: give it at least one image"),
        ([[[a, b]]], ["caption en"], "expected a PIL image, a path, bytes or an array of pixels, got list"),
        ([[a, None]], ["caption en"], "expected a PIL image, a path, bytes or an array of pixels, got NoneType"),
        ([[a, b]], ["<image><image><image>caption en"], "starts with 3 <image> markers for 2 images: give one per"),
        ([[a, b]], ["<image> <image>caption en"], "starts with 1 <image> markers for 2 images"),  # a space between
        ([a], ["<image><image>caption en"], "starts with 2 <image> markers for 1 image:"),
    ]
    for name, call in entry_points(pipe).items():
        for rows, prompts, message in cases:
            with pytest.raises(InputError, match=message) as e:
                call(rows, prompts)
            assert "\n" not in str(e.value), (name, str(e.value))


@pytest.mark.parametrize("prompt", [None, 123, b"caption en"])
def test_a_prompt_that_is_no_string_with_a_list_of_images_is_a_one_line_error(pg1, prompt):
    """As with one image: before, generate and stream_batch put markers before it and raised a TypeError."""
    pipe = palitorch.load(pg1[0])
    for name, call in entry_points(pipe).items():
        with pytest.raises(InputError, match="string") as e:
            call([images(2, seed=8)], [prompt])
        assert "\n" not in str(e.value), (name, str(e.value))


def test_a_prompt_whose_images_overflow_the_context_says_so(pg1):
    """Three images of 256 tokens in a context of 600: the error names the images and says to give fewer (before:
    "771 tokens with the image ... shorten it", where the text is 3 tokens)."""
    import dataclasses

    pipe = palitorch.load(pg1[0])
    row = images(3, seed=9)
    cfg, length = pipe.model.cfg, pipe.processor.max_length
    pipe.model.cfg = cfg.replace(text=dataclasses.replace(cfg.text, max_position_embeddings=600))
    pipe.processor.max_length = 600
    try:
        message = r"tokens with its 3 images \(256 tokens each\).*context of 600; shorten it or give fewer images$"
        for call in entry_points(pipe).values():
            with pytest.raises(InputError, match=message):
                call([row], ["caption en"])
        with pytest.raises(InputError, match="tokens with the image, .* of 600; shorten it$"):
            pipe.generate(row[0], "caption en " + "x " * 400, max_new_tokens=2)
    finally:
        pipe.model.cfg, pipe.processor.max_length = cfg, length
