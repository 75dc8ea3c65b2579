"""Several images for one prompt (PaliGemma's NLVR2 and video transfers: each image encoded apart, their tokens one
after another), against transformers, whose processor takes a list of images per prompt: `images=[[a, b], [c]]`.

Tolerances: logprobs within DIVERSE_LOGPROB_TOL (hf_factory: float32 rounding on weights made chaotic on purpose),
token ids exactly.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import palitorch
from palitorch.errors import InputError

from hf_factory import DIVERSE_LOGPROB_TOL, diverse, hf_processor, hf_suffix_logprobs

STEPS = 12


def images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 9 * i, 44 + 5 * i, 3), dtype=np.uint8)) for i in range(n)]


def hf_greedy(folder, hf, rows, prompts):
    """transformers' greedy answers (tokens [B, n], logprobs [B, n]) for rows of images, left-padded."""
    proc = hf_processor(folder)
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=rows, text=prompts, return_tensors="pt", padding=True)
    out = hf.generate(**inputs, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      max_new_tokens=STEPS, min_new_tokens=STEPS)
    toks = out.sequences[:, inputs["input_ids"].shape[1]:]
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    return inputs, toks, logp.gather(-1, toks[..., None])[..., 0]


@pytest.mark.parametrize("version", [1, 2])
def test_rows_of_several_images_answer_as_transformers(ckpt_factory, version):
    """A batch mixing 2, 1 and 3 images per prompt (one image shared by two rows): the same prompt tokens as
    transformers' processor, then the same greedy tokens and logprobs; generate, stream_batch, a live batch and beam
    search's per-room split agree with one another."""
    folder, hf = diverse(ckpt_factory, version)
    pipe = palitorch.load(folder)
    a, b, c, d = images(4)
    rows, prompts = [[a, b], [c], [d, a, b]], ["answer en are they alike?", "caption en", "answer en which differs?"]
    inputs, ref_toks, ref_lp = hf_greedy(folder, hf, rows, prompts)
    marked = ["<image><image>answer en are they alike?", "caption en", "<image>" * 3 + "answer en which differs?"]
    for p, ids, mask in zip(marked, inputs["input_ids"], inputs["attention_mask"]):
        assert pipe.processor.encode(p).ids == ids[mask.bool()].tolist()
    ours = pipe.generate(rows, prompts, max_new_tokens=STEPS, min_new_tokens=STEPS)
    for r, t, lp in zip(ours, ref_toks, ref_lp):
        assert r.token_ids == t.tolist()
        torch.testing.assert_close(torch.tensor(r.logprobs), lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)
    assert [r.prompt_tokens for r in ours] == inputs["attention_mask"].sum(-1).tolist()
    assert len({tuple(r.token_ids) for r in ours}) == 3, "the rows' answers should differ"
    # The prompts may carry their markers themselves, as transformers' do; each row alone gives its batch answer.
    assert [r.token_ids for r in pipe.generate(rows, marked, max_new_tokens=STEPS, min_new_tokens=STEPS)] == \
        [r.token_ids for r in ours]
    for row, p, r in zip(rows, prompts, ours):
        assert pipe.generate([row], [p], max_new_tokens=STEPS, min_new_tokens=STEPS)[0].token_ids == r.token_ids
    events = list(pipe.stream_batch(rows, prompts, max_new_tokens=STEPS, min_new_tokens=STEPS))
    assert [item.token_ids for _, item in sorted(e for e in events if not isinstance(e[1], str))] == \
        [r.token_ids for r in ours]
    assert "".join(pipe.stream(rows[2], prompts[2], max_new_tokens=STEPS, min_new_tokens=STEPS)) == ours[2].text
    with pipe.live(max_rows=4, max_new_tokens=STEPS, min_new_tokens=STEPS) as live:
        seqs, _ = live.admit(rows, prompts)
        done = {}
        while live.active:
            done.update((id(q), r) for q, r in live.step() if not isinstance(r, str))
    assert [done[id(q)].token_ids for q in seqs] == [r.token_ids for r in ours]


def test_beam_rows_with_less_room_keep_their_own_images(ckpt_factory):
    """Beam search splits a batch by each row's room before the context's end: a split row must keep its own images
    (the index of a row's images is no longer the row's number)."""
    import dataclasses

    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    a, b, c = images(3, seed=1)
    rows, prompts = [[a, b], c, [c, a]], ["caption en", "caption en " + "x " * 30, "answer en which one is it?"]
    lengths = [len(pipe.processor.encode(p).ids) for p in
               ["<image><image>" + prompts[0], prompts[1], "<image><image>" + prompts[2]]]
    cfg = pipe.model.cfg
    pipe.model.cfg = cfg.replace(text=dataclasses.replace(cfg.text, max_position_embeddings=max(lengths) + 3))
    try:
        kw = dict(num_beams=2, max_new_tokens=8)
        together = pipe.generate(rows, prompts, **kw)
        apart = [pipe.generate([row], [p], **kw)[0] for row, p in zip(rows, prompts)]
    finally:
        pipe.model.cfg = cfg
    assert [min(8, max(lengths) + 3 - n) for n in lengths] == [8, 8, 3], "the last row has less room"
    assert [r.token_ids for r in together] == [r.token_ids for r in apart]


def test_score_of_an_answer_about_two_images_is_transformers(ckpt_factory):
    folder, hf = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    a, b = images(2, seed=2)
    proc = hf_processor(folder)
    ids, ref = hf_suffix_logprobs(proc, hf, [a, b], "answer en same?", "no they differ")
    r = pipe.score([[a, b]], ["answer en same?"], ["no they differ"])[0]
    assert r.token_ids == ids
    torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=DIVERSE_LOGPROB_TOL, rtol=0)


def test_bad_rows_of_images_are_one_line_errors(pg1):
    pipe = palitorch.load(pg1[0])
    a, b = images(2, seed=3)
    with pytest.raises(InputError, match="list of images is empty"):
        pipe.generate([[]], ["caption en"])
    with pytest.raises(InputError, match="starts with 1 <image> markers for 2 images"):
        pipe.generate([[a, b]], ["<image>caption en"])
    with pytest.raises(InputError, match="starts with 2 <image> markers for 1 image:"):
        pipe.generate([a], ["<image><image>caption en"])
    with pytest.raises(InputError, match="expected a PIL image, a path, bytes or an array of pixels, got list"):
        pipe.generate([[[a]]], ["caption en"])
