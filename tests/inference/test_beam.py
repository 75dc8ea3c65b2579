"""Beam search: one beam is greedy, more beams find sequences at least as likely, batches equal single runs.

Tolerances: tokens equal; logprobs within 1e-4; scores compared with a 1e-4 slack.
"""

import pytest
import torch
from test_generate import PROMPTS, diverse, images

import palitorch
from palitorch.inference.beam import beam_search
from palitorch.inference.generate import encode_prompts, eos_ids
from palitorch.inference.sampling import GenerationOptions


@pytest.fixture(scope="module")
def pipe(ckpt_factory):
    return palitorch.load(diverse(ckpt_factory, 1)[0])


def run_beams(pipe, imgs, prompts, **kw):
    opts = GenerationOptions(**kw).validate()
    batch = encode_prompts(pipe.model, pipe.processor, *pipe._pixels(imgs)[:1], prompts)
    return beam_search(pipe.model, pipe.processor, batch, opts, eos_ids(pipe.model, pipe.processor),
                       opts.max_new_tokens)


def test_one_beam_is_greedy_even_when_answers_end_early(pipe):
    imgs = images(3)
    free = pipe.generate(imgs, PROMPTS, max_new_tokens=12, min_new_tokens=12)
    eos = free[0].token_ids[5]  # make one generated token an EOS, so that row 0 ends early
    cfg = pipe.model.cfg
    pipe.model.cfg = cfg.replace(eos_token_ids=(eos,))
    try:
        greedy = pipe.generate(imgs, PROMPTS, max_new_tokens=12)
        beams = run_beams(pipe, imgs, PROMPTS, max_new_tokens=12, num_beams=1)
    finally:
        pipe.model.cfg = cfg
    assert greedy[0].finish_reason == "eos"
    for g, b in zip(greedy, beams):
        assert (b.token_ids, b.finish_reason, b.text) == (g.token_ids, g.finish_reason, g.text)
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(g.logprobs), atol=1e-4, rtol=0)


def test_more_beams_score_at_least_greedy(pipe):
    imgs = images(3, seed=2)
    greedy = pipe.generate(imgs, PROMPTS, max_new_tokens=10)
    beams = pipe.generate(imgs, PROMPTS, max_new_tokens=10, num_beams=4)
    differs = 0
    for g, b in zip(greedy, beams):
        assert g.finish_reason == b.finish_reason == "length", "equal lengths make the sums comparable"
        assert sum(b.logprobs) >= sum(g.logprobs) - 1e-4
        differs += b.token_ids != g.token_ids
    assert differs, "beam search should find something greedy did not"


def test_beam_batch_equals_one_at_a_time(pipe):
    imgs = images(2, seed=3)
    batch = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=8, num_beams=3)
    for im, p, b in zip(imgs, PROMPTS[:2], batch):
        one = pipe.generate(im, p, max_new_tokens=8, num_beams=3)
        assert one.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(one.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    # The caches were widened to 3 beams a row; a plain call afterwards still works.
    assert pipe.generate(imgs[0], PROMPTS[0], max_new_tokens=4).token_ids


def test_beams_of_prompts_near_the_context_end_run_as_alone(pipe):
    """Near the end of the context, a short prompt has more room than a long one: batched, each prompt's beams run
    to its own room, as alone (they shared the longest prompt's, and the short one's answer was cut)."""
    import dataclasses

    imgs, prompts = images(2, seed=4), [PROMPTS[0], PROMPTS[0] + " and more words here"]
    lengths = [len(pipe.processor.encode(p).ids) for p in prompts]
    assert lengths[1] > lengths[0]
    cfg = pipe.model.cfg
    pipe.model.cfg = cfg.replace(text=dataclasses.replace(cfg.text, max_position_embeddings=lengths[1] + 4))
    try:
        kw = dict(max_new_tokens=12, min_new_tokens=12, num_beams=2)
        batch = pipe.generate(imgs, prompts, **kw)
        alone = [pipe.generate(im, p, **kw) for im, p in zip(imgs, prompts)]
    finally:
        pipe.model.cfg = cfg
    assert [len(r.token_ids) for r in alone] == [min(12, lengths[1] + 4 - n) for n in lengths]
    for a, b in zip(alone, batch):
        assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)


def test_length_penalty_favours_longer_answers(pipe):
    from collections import Counter

    imgs = images(3, seed=2)
    free = pipe.generate(imgs, PROMPTS, max_new_tokens=16, min_new_tokens=16)
    cfg = pipe.model.cfg
    gained = tried = 0
    for eos, _ in Counter(t for r in free for t in r.token_ids).most_common(5):  # tokens that end answers early
        pipe.model.cfg = cfg.replace(eos_token_ids=(eos,))
        try:
            plain = pipe.generate(imgs, PROMPTS, max_new_tokens=16, num_beams=4)
            longer = pipe.generate(imgs, PROMPTS, max_new_tokens=16, num_beams=4, length_penalty=3.0)
        finally:
            pipe.model.cfg = cfg
        if not any(r.finish_reason == "eos" for r in plain):
            continue  # this token never ends a beam here: no evidence either way
        tried += 1
        assert all(len(a.token_ids) >= len(b.token_ids) for a, b in zip(longer, plain))
        gained += sum(len(r.token_ids) for r in longer) - sum(len(r.token_ids) for r in plain)
    assert tried and gained > 0


def hf_beams(folder, hf, imgs, prompts, eos, **kw):
    """transformers' beam search -> each row's answer (its tokens up to the first EOS) and whether it ended there."""
    from hf_factory import hf_processor

    proc = hf_processor(folder)
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
    out = hf.generate(**inputs, do_sample=False, eos_token_id=eos, **kw)
    answers = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        answers.append((row[:end], end is not None))
    return answers


@pytest.mark.parametrize("version", [1, 2])
def test_beam_search_equals_transformers(ckpt_factory, version):
    """The same answers as transformers' generate(num_beams=...) over its settings: early_stopping (its default
    False, True, "never"), length penalties of both signs, repetition penalties (applied to log-probabilities), and
    min_new_tokens, on a padded batch whose beams end on one of two EOS ids."""
    from collections import Counter

    folder, hf = diverse(ckpt_factory, version)
    pipe = palitorch.load(folder)
    imgs, prompts = images(4), [*PROMPTS, "ocr"]
    free = pipe.generate(imgs, prompts, max_new_tokens=12, min_new_tokens=12)
    eos = [1, Counter(t for r in free for t in r.token_ids[1:]).most_common(1)[0][0]]  # so that beams do end
    cfg = pipe.model.cfg
    pipe.model.cfg = cfg.replace(eos_token_ids=tuple(eos))
    cases = [dict(num_beams=m, length_penalty=lp, early_stopping=es) for m in (2, 4) for lp in (1.0, -1.0, 2.0)
             for es in (False, True, "never")]
    cases += [dict(num_beams=3, repetition_penalty=1.5), dict(num_beams=3, repetition_penalty=0.7),
              dict(num_beams=3, min_new_tokens=4, repetition_penalty=1.3)]
    ended = 0
    try:
        for kw in cases:
            want = hf_beams(folder, hf, imgs, prompts, eos, max_new_tokens=10, **kw)
            got = pipe.generate(imgs, prompts, max_new_tokens=10, **kw)
            for r, (tokens, at_eos) in zip(got, want):
                assert (r.token_ids, r.finish_reason) == (tokens, "eos" if at_eos else "length"), kw
                ended += at_eos
    finally:
        pipe.model.cfg = cfg
    assert ended >= len(cases) // 2, (ended, "answers should end on an EOS often, for the stopping rules to matter")


@pytest.mark.parametrize("version", [1, 2])
def test_every_kept_beam_with_its_score_as_transformers_returns_them(ckpt_factory, version):
    """`Result.beams`: the finished hypotheses, best first, as transformers' num_return_sequences=num_beams returns
    them (tokens, ended on an EOS or not), and `beam_score` as its sequences_scores (within 1e-4)."""
    from collections import Counter

    from hf_factory import hf_processor

    folder, hf = diverse(ckpt_factory, version)
    pipe = palitorch.load(folder)
    imgs, prompts = images(2), PROMPTS[:2]
    free = pipe.generate(imgs, prompts, max_new_tokens=10, min_new_tokens=10)
    eos = [1, Counter(t for r in free for t in r.token_ids[1:]).most_common(1)[0][0]]
    cfg = pipe.model.cfg
    pipe.model.cfg = cfg.replace(eos_token_ids=tuple(eos))
    proc = hf_processor(folder)
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
    try:
        for kw in (dict(num_beams=3), dict(num_beams=4, length_penalty=2.0), dict(num_beams=2, length_penalty=-1.0),
                   dict(num_beams=4, early_stopping="never"), dict(num_beams=3, early_stopping=True)):
            out = hf.generate(**inputs, do_sample=False, eos_token_id=eos, max_new_tokens=8, num_return_sequences=
                              kw["num_beams"], output_scores=True, return_dict_in_generate=True, **kw)
            got = pipe.generate(imgs, prompts, max_new_tokens=8, **kw)
            rows = out.sequences[:, inputs["input_ids"].shape[1]:].tolist()
            for p, r in enumerate(got):
                assert r.beams[0].token_ids == r.token_ids and len(r.beams) == kw["num_beams"]
                for k, beam in enumerate(r.beams):
                    row = rows[p * kw["num_beams"] + k]
                    end = next((i for i, t in enumerate(row) if t in eos), None)
                    assert beam.token_ids == row[:end], (kw, p, k)
                    assert beam.finish_reason == ("eos" if end is not None else "length")
                    assert abs(beam.beam_score - float(out.sequences_scores[p * kw["num_beams"] + k])) < 1e-4
    finally:
        pipe.model.cfg = cfg
