"""`top_logprobs=k`: each generated token's k most likely alternatives under the model's raw distribution, against
transformers' logits, and the same on every path that decodes (greedy, sampled, stop strings, streams, beams, a
live batch, a compiled step), without changing the tokens chosen.

Tolerances: ids equal; logprobs within DIVERSE_LOGPROB_TOL (3e-4) of transformers' (float32 on CPU, chaotic weights
on purpose; see hf_factory), 1e-5 between two palitorch paths that batch rows differently, 1e-4 compiled vs eager.
"""

import pytest
import torch
from test_continuous import run_live
from test_generate import PROMPTS, images

import palitorch
from palitorch.errors import InputError
from palitorch.inference.answer import top_alternatives
from palitorch.inference.sampling import GenerationOptions

from hf_factory import DIVERSE_LOGPROB_TOL, diverse, hf_processor

K, STEPS = 5, 12


def hf_alternatives(folder, hf, imgs, prompts, k: int, steps: int):
    """transformers' greedy tokens [B, n] and, per step, the k largest log_softmax values and their ids [B, n, k]."""
    proc = hf_processor(folder)
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
    out = hf.generate(**inputs, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      max_new_tokens=steps, min_new_tokens=steps)
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    values, ids = logp.topk(k, dim=-1)
    return out.sequences[:, inputs["input_ids"].shape[1]:], ids, values


def assert_alternatives(result, ids, values, tol):
    assert len(result.top_logprobs) == len(result.token_ids)
    got_ids = [[i for i, _ in step] for step in result.top_logprobs]
    got_values = torch.tensor([[v for _, v in step] for step in result.top_logprobs])
    assert got_ids == ids.tolist()
    torch.testing.assert_close(got_values, values, atol=tol, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_alternatives_match_transformers_single_and_padded_batch(ckpt_factory, version):
    folder, hf = diverse(ckpt_factory, version)
    pipe = palitorch.load(folder)
    imgs = images(3)
    for ims, prompts in ((imgs[:1], PROMPTS[:1]), (imgs, PROMPTS)):
        toks, ids, values = hf_alternatives(folder, hf, ims, prompts, K, STEPS)
        plain = pipe.generate(ims, prompts, max_new_tokens=STEPS, min_new_tokens=STEPS)
        ours = pipe.generate(ims, prompts, max_new_tokens=STEPS, min_new_tokens=STEPS, top_logprobs=K)
        for r, p, t, i, v in zip(ours, plain, toks, ids, values):
            assert r.token_ids == p.token_ids == t.tolist()  # asking for alternatives changes no token
            assert p.top_logprobs is None
            assert_alternatives(r, i, v, DIVERSE_LOGPROB_TOL)
            # greedy: the chosen token is the first alternative, with the logprob reported for it
            assert all(step[0][0] == tok for step, tok in zip(r.top_logprobs, r.token_ids))
            torch.testing.assert_close(torch.tensor([s[0][1] for s in r.top_logprobs]), torch.tensor(r.logprobs),
                                       atol=1e-6, rtol=0)


def test_sampling_stop_strings_and_streams_keep_their_tokens(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    img = images(1)[0]
    sampled = dict(temperature=1.5, top_k=40, seed=3, max_new_tokens=STEPS)
    plain, ours = pipe.generate(img, PROMPTS[0], **sampled), pipe.generate(img, PROMPTS[0], top_logprobs=3, **sampled)
    assert ours.token_ids == plain.token_ids and ours.logprobs == plain.logprobs  # the same random draws
    for tok, lp, step in zip(ours.token_ids, ours.logprobs, ours.top_logprobs):
        values = [v for _, v in step]
        assert len(step) == 3 and values == sorted(values, reverse=True) and lp <= values[0] + 1e-6
        if tok in dict(step):
            assert abs(dict(step)[tok] - lp) < 1e-6
    greedy = pipe.generate(img, PROMPTS[0], max_new_tokens=STEPS, top_logprobs=2)
    stop = pipe.processor.decode(greedy.token_ids[:4])[-2:]  # ends the answer at the 4th token or before
    cut = pipe.generate(img, PROMPTS[0], max_new_tokens=STEPS, top_logprobs=2, stop=[stop])
    assert cut.finish_reason == "stop" and len(cut.top_logprobs) == len(cut.token_ids) <= 4
    assert cut.top_logprobs == greedy.top_logprobs[:len(cut.token_ids)]
    stream = pipe.stream(img, PROMPTS[0], max_new_tokens=STEPS, top_logprobs=2)
    assert "".join(stream) == greedy.text and stream.result.top_logprobs == greedy.top_logprobs


def test_beam_search_reports_each_chosen_step_s_alternatives(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    imgs = images(2)
    plain = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=8, num_beams=3)
    ours = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=8, num_beams=3, top_logprobs=4)
    one_beam = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=8, num_beams=1, top_logprobs=4)
    greedy = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=8, top_logprobs=4)
    for r, p, b1, g in zip(ours, plain, one_beam, greedy):
        assert r.token_ids == p.token_ids and len(r.top_logprobs) == len(r.token_ids)
        assert b1.token_ids == g.token_ids and b1.top_logprobs == g.top_logprobs
        for tok, lp, step in zip(r.token_ids, r.logprobs, r.top_logprobs):
            assert len(step) == 4 and lp <= step[0][1] + 1e-6
            if tok in dict(step):
                assert abs(dict(step)[tok] - lp) < 1e-5
    # the first step is the prompt's own distribution, whatever the beams chose: the same as greedy's
    for r, g in zip(ours, greedy):
        assert [i for i, _ in r.top_logprobs[0]] == [i for i, _ in g.top_logprobs[0]]


def test_a_live_batch_reports_them_per_sequence(ckpt_factory):
    """Rows that ask for alternatives (3, 1) and rows that do not (0) share a live batch, joining at different steps:
    each gets what `generate` gives it alone."""
    folder, _ = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    imgs, prompts = images(4), PROMPTS + ["caption en"]
    ks = [3, 0, 1, 3]
    opts = [GenerationOptions(max_new_tokens=8, top_logprobs=k) for k in ks]
    results = {}
    with pipe.live(max_rows=3) as live:
        waiting, step = [0, 1, 2, 3], 0
        while waiting or live.active:
            due = [i for i in waiting if i <= step][:live.free_rows]
            got = live.admit([imgs[i] for i in due], [prompts[i] for i in due], tags=due,
                             options=[opts[i] for i in due]) if due else None
            events = (got[1] if got else []) + live.step()
            waiting = [i for i in waiting if not (got and i in due)]
            results.update({q.tag: item for q, item in events if not isinstance(item, str)})
            step += 1
    for i, k in enumerate(ks):
        alone = pipe.generate(imgs[i], prompts[i], max_new_tokens=8, top_logprobs=k)
        assert results[i].token_ids == alone.token_ids
        if k == 0:
            assert results[i].top_logprobs is None
            continue
        assert [[t for t, _ in s] for s in results[i].top_logprobs] == [[t for t, _ in s] for s in alone.top_logprobs]
        got = torch.tensor([[v for _, v in s] for s in results[i].top_logprobs])
        torch.testing.assert_close(got, torch.tensor([[v for _, v in s] for s in alone.top_logprobs]), atol=1e-5,
                                   rtol=0)
    plain, _, _ = run_live(pipe, imgs, prompts, [0, 0, 1, 2], max_rows=2, max_new_tokens=8)
    assert all(r.top_logprobs is None for r in plain)


def test_a_compiled_step_gives_the_eager_alternatives(ckpt_factory):
    folder, _ = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    imgs = images(2)
    eager = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=STEPS, top_logprobs=K)
    pipe.compile()
    compiled = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=STEPS, top_logprobs=K)
    for c, e in zip(compiled, eager):
        assert c.token_ids == e.token_ids
        assert [[t for t, _ in s] for s in c.top_logprobs] == [[t for t, _ in s] for s in e.top_logprobs]
        torch.testing.assert_close(torch.tensor([[v for _, v in s] for s in c.top_logprobs]),
                                   torch.tensor([[v for _, v in s] for s in e.top_logprobs]), atol=1e-4, rtol=0)


def test_greedy_alternatives_come_from_one_fused_step(ckpt_factory):
    """Greedy decoding with alternatives runs `greedy_top` (forward, choice and alternatives in one function, one
    compiled graph), in `generate` and in a live batch; a repetition penalty still takes the logits step. Counting
    wrappers stand in for torch.compile."""
    from palitorch.inference import generate as engine

    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    imgs = images(2)
    eager = pipe.generate(imgs, PROMPTS[:2], max_new_tokens=6, min_new_tokens=6, top_logprobs=2)
    calls = []

    def counting(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    pipe._steps = engine.Steps(counting("logits", engine.token_forward), counting("greedy", engine.greedy_forward),
                               greedy_top=counting("greedy_top", engine.greedy_top_forward))
    assert pipe.generate(imgs, PROMPTS[:2], max_new_tokens=6, min_new_tokens=6, top_logprobs=2) == eager
    assert calls == ["greedy_top"] * 5
    with pipe.live(max_rows=2) as live:
        _, events = live.admit(imgs[:1], PROMPTS[:1], options=[GenerationOptions(max_new_tokens=6, top_logprobs=2)])
        while live.active:
            events += live.step()
    [alone] = [r for _, r in events if not isinstance(r, str)]
    assert alone.token_ids == eager[0].token_ids  # and the alternatives, to 1e-5 (rows batched differently)
    assert [[t for t, _ in s] for s in alone.top_logprobs] == [[t for t, _ in s] for s in eager[0].top_logprobs]
    torch.testing.assert_close([[v for _, v in s] for s in alone.top_logprobs],
                               [[v for _, v in s] for s in eager[0].top_logprobs], atol=1e-5, rtol=0)
    assert calls[5:] == ["greedy_top"] * (len(eager[0].token_ids) - 1)
    calls.clear()
    pipe.generate(imgs, PROMPTS[:2], max_new_tokens=6, min_new_tokens=6, top_logprobs=2, repetition_penalty=1.2)
    assert calls == ["logits"] * 5


@pytest.mark.parametrize("value", [-1, 21, 2.5, True, "3"])
def test_a_bad_count_is_a_one_line_input_error(value):
    pipe = palitorch.load()
    with pytest.raises(InputError, match="top_logprobs must be an integer from 0 to 20"):
        pipe.generate(images(1)[0], "caption en", top_logprobs=value)


def test_k_past_the_vocabulary_gives_the_whole_vocabulary_in_order():
    logprobs = torch.log_softmax(torch.tensor([[0.5, 2.0, -1.0]]), -1)
    ids, values = top_alternatives(logprobs, 20)
    assert ids.tolist() == [[1, 0, 2]] and torch.equal(values, logprobs[:, [1, 0, 2]])


def test_stream_pieces_carry_their_tokens(ckpt_factory, monkeypatch):
    """A streamed piece carries the tokens that brought its text: the two byte tokens of 'é' ride with the piece
    that shows it, and in order the pieces' tokens are the Result's (ids, logprobs, alternatives)."""
    from palitorch.inference import generate as engine

    folder, _ = diverse(ckpt_factory, 1)
    pipe = palitorch.load(folder)
    ids = pipe.processor.tokenizer.encode("héllo ✓ the", add_special_tokens=False).ids

    def scripted(model, prompts, opts, eos, pad_id, steps, fns=None):
        for n, i in enumerate(ids[:steps]):
            top = torch.tensor([[i, 3]]), torch.tensor([[-0.5 - n, -9.0]])
            yield torch.tensor([i]), torch.tensor([-0.5 - n]), top

    monkeypatch.setattr(engine, "decode", scripted)
    stream = pipe.stream(images(1)[0], "caption en", max_new_tokens=len(ids), top_logprobs=2)
    pieces = list(stream)
    tokens = [t for p in pieces for t in p.tokens]
    r = stream.result
    assert [t for t, _, _ in tokens] == r.token_ids[:len(tokens)] and len(tokens) >= len(ids) - 2
    assert [lp for _, lp, _ in tokens] == r.logprobs[:len(tokens)]
    assert [alt for _, _, alt in tokens] == r.top_logprobs[:len(tokens)]
    [with_e] = [p for p in pieces if "é" in p]
    assert len([t for t, _, _ in with_e.tokens if pipe.processor.decode([t]) == "\ufffd"]) == 2
