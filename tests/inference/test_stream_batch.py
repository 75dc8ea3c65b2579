"""`Pipeline.stream_batch`: a batch decoded as events. Each row's pieces concatenate to its Result, which equals
`generate`'s answer for that input alone (tokens, logprobs, finish reason), stop strings included; a row's Result
comes as soon as it ends; `keep_going` stops the decoding; a compiled pipeline's padding rows never show."""

import pytest
import torch
from test_generate import PROMPTS, images

import palitorch

from hf_factory import diverse


def collect(events):
    """-> ({row: concatenated pieces}, {row: Result}, [rows in the order their Results came], [all events])"""
    pieces, results, order, seen = {}, {}, [], []
    for i, item in events:
        seen.append((i, item))
        if isinstance(item, str):
            assert i not in results, "a piece after the row's Result"
            pieces[i] = pieces.get(i, "") + item
        else:
            results[i] = item
            order.append(i)
    return pieces, results, order, seen


@pytest.mark.parametrize("version", [1, 2])
def test_each_row_streams_what_generate_answers_alone(ckpt_factory, version):
    pipe = palitorch.load(diverse(ckpt_factory, version)[0])
    imgs = images(4)
    prompts = PROMPTS + ["ocr"]
    budgets = dict(max_new_tokens=12)
    alone = [pipe.generate(im, p, **budgets) for im, p in zip(imgs, prompts)]
    # a stop string taken from one answer's middle, so that one row stops early and the others may not
    stop = alone[1].text[3:5]
    assert stop
    alone_stop = [pipe.generate(im, p, stop=[stop], **budgets) for im, p in zip(imgs, prompts)]
    for opts, expected in (({}, alone), ({"stop": [stop]}, alone_stop)):
        pieces, results, order, _ = collect(pipe.stream_batch(imgs, prompts, **budgets, **opts))
        assert sorted(order) == [0, 1, 2, 3]
        for i, want in enumerate(expected):
            r = results[i]
            assert (r.token_ids, r.finish_reason, r.text) == (want.token_ids, want.finish_reason, want.text)
            torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)
            assert pieces.get(i, "") == r.text
    assert alone_stop[1].finish_reason == "stop"
    steps = [len(alone_stop[i].token_ids) + (alone_stop[i].finish_reason == "eos") for i in order]  # EOS: a step
    assert steps == sorted(steps) and len(set(steps)) > 1, "a row's Result should come as soon as it ends"


def test_keep_going_stops_the_decoding(ckpt_factory):
    pipe = palitorch.load(diverse(ckpt_factory, 1)[0])
    imgs = images(2)
    steps = []

    def keep_going():
        steps.append(1)
        return len(steps) < 3

    _, results, _, _ = collect(pipe.stream_batch(imgs, PROMPTS[:2], keep_going=keep_going, max_new_tokens=20,
                                                 min_new_tokens=20))
    assert len(steps) == 3 and results == {}  # asked once per step; no row reached its end
    # the pipeline is free again: the stream released the caches
    assert pipe.generate(imgs[0], PROMPTS[0], max_new_tokens=2).finish_reason == "length"


def test_a_compiled_pipelines_padding_rows_do_not_show(ckpt_factory):
    pipe = palitorch.load(diverse(ckpt_factory, 2)[0])
    imgs, prompts = images(3), PROMPTS  # 3 rows: a compiled greedy batch of 3 is a rung; 5 rows would pad to 6
    imgs, prompts = imgs + imgs[:2], prompts + prompts[:2]
    alone = [pipe.generate(im, p, max_new_tokens=6) for im, p in zip(imgs, prompts)]
    pipe.compile()
    _, results, _, seen = collect(pipe.stream_batch(imgs, prompts, max_new_tokens=6))
    assert {i for i, _ in seen} == set(range(5)) and pipe._greedy_batches == {6}
    assert [results[i].token_ids for i in range(5)] == [a.token_ids for a in alone]
