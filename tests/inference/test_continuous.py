"""Continuous batching (`Pipeline.live`): sequences that join a running decode at different steps, in rows freed by
others, get the answers they get alone, through moves of the cache slots and resizes of the batch.

Tolerances: greedy tokens and texts equal; logprobs within 1e-4 (float32 on CPU, same weights; a sequence's numbers
are computed in batches of other sizes, with other neighbours, than alone).
"""

import dataclasses
import weakref

import pytest
import torch
from test_generate import PROMPTS, images, windowed

import palitorch
from palitorch.errors import InputError
from palitorch.inference import generate as engine
from palitorch.inference.sampling import GenerationOptions

from hf_factory import diverse

LONG = "answer en is there a red or a blue or a green shape in the picture and where is it"
ASKS = PROMPTS[:2] + [LONG] + PROMPTS[2:] + ["caption en", "ocr", "answer en what shape is it?", "detect circle"]


def run_live(pipe, imgs, prompts, arrivals, max_rows, streams=False, **opts):
    """Admit request i at step arrivals[i] (or at the first step after it with room), step until all have ended ->
    (results, each request's streamed pieces joined, a log of what happened: admissions, rows per step)."""
    results, pieces = {}, {}
    log = {"admitted_at": {}, "rows": [], "moves": 0, "caches": set(), "kept": []}
    with pipe.live(max_rows=max_rows, **opts) as live:
        real_move = live._move

        def move(slot):
            log["moves"] += slot != live.cur.slot and bool(live.active)
            real_move(slot)

        live._move = move
        waiting, step = list(range(len(prompts))), 0

        def take(events):
            for q, item in events:
                if isinstance(item, str):
                    pieces[q.tag] = pieces.get(q.tag, "") + item
                else:
                    results[q.tag] = item

        while waiting or live.active:
            due = [i for i in waiting if arrivals[i] <= step][:live.free_rows]
            if due:
                got = live.admit([imgs[i] for i in due], [prompts[i] for i in due], tags=due,
                                 streams=[streams] * len(due))
                if got is not None:
                    waiting = [i for i in waiting if i not in due]
                    log["admitted_at"].update({i: step for i in due})
                    take(got[1])
            log["rows"].append(len(live.seqs))
            k = pipe.model.language_model.layers[0].attn.kv_cache.k
            log["caches"].add((len(live.seqs), k.data_ptr()))
            if not any(ref() is k for ref in log["kept"]):
                log["kept"].append(weakref.ref(k))  # (dead once nothing holds those caches)
            take(live.step())
            step += 1
    return [results[i] for i in range(len(prompts))], pieces, log


def assert_alone(pipe, imgs, prompts, got, **opts):
    for img, prompt, r in zip(imgs, prompts, got):
        want = pipe.generate(img, prompt, **opts)
        assert (r.token_ids, r.text, r.finish_reason) == (want.token_ids, want.text, want.finish_reason), prompt
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("version,pooled", [(1, False), (2, False), (1, True)])
def test_sequences_joining_at_any_step_get_their_answers_alone(ckpt_factory, tmp_path, version, pooled):
    """Thirteen requests (one with a prompt ~35 tokens longer) arriving over 100 steps into at most 3 rows: the batch
    grows and shrinks, the slots in use move (for the long prompt, and when later arrivals' budgets would run past
    the cache's end), and every answer is the one `generate` gives alone. Gemma 2 with a sliding window (100) shorter
    than the sequences, so that the window's mask matters across moves. `pooled`: steps as CUDA graphs run them
    (`copy_outputs`), for which each batch size keeps its caches; else a resize frees the old ones."""
    folder = windowed(ckpt_factory, tmp_path)[0] if version == 2 else diverse(ckpt_factory, 1)[0]
    pipe = palitorch.load(folder)
    if pooled:
        pipe._steps = engine.Steps(copy_outputs=True)  # eager steps whose outputs are copied, as CUDA graphs' are
    prompts = ASKS + ASKS[:5]
    imgs = images(len(prompts))
    arrivals = [0, 0, 1, 2, 9, 17, 30, 40, 44, 60, 61, 70, 100]
    opts = {"max_new_tokens": 24, "min_new_tokens": 4}
    got, _, log = run_live(pipe, imgs, prompts, arrivals, max_rows=3, **opts)
    assert_alone(pipe, imgs, prompts, got, **opts)
    assert all(len(r.token_ids) == 24 for r in got)  # (these weights never choose EOS)
    assert log["moves"] >= 2, log
    assert max(log["rows"]) == 3 and 1 in log["rows"][log["rows"].index(3):], log["rows"]  # grew, then shrank
    if pooled:  # back at a size, the batch reuses that size's caches
        assert len(log["caches"]) == len(set(log["rows"]))
        assert {rows for rows, _ in pipe._cache_pool} == set(log["rows"])
    else:  # only the caches in use are kept (a batch that grew to 8 rows kept 1 + 2 + ... + 8 rows' worth)
        assert pipe._cache_pool == {} and sum(ref() is not None for ref in log["kept"]) == 1
    assert any(log["admitted_at"][i] > arrivals[i] for i in range(len(prompts))), "no request waited for a row"


def test_penalties_stop_strings_and_streams_in_a_live_batch(ckpt_factory):
    """The unfused step (a repetition penalty, EOS barred for min_new_tokens row by row) and stop strings: answers
    as alone; a streamed sequence's pieces make its answer's text."""
    pipe = palitorch.load(diverse(ckpt_factory, 1)[0])
    imgs = images(5)
    prompts = ASKS[:5]
    opts = {"max_new_tokens": 20, "min_new_tokens": 6, "repetition_penalty": 1.3}
    alone = pipe.generate(imgs, prompts, **opts)
    assert alone[0].text != pipe.generate(imgs[0], prompts[0], max_new_tokens=20, min_new_tokens=6).text
    stop = alone[2].text[len(alone[2].text) // 2:][:3]  # a piece of one answer: it ends there
    got, pieces, _ = run_live(pipe, imgs, prompts, [0, 3, 3, 5, 11], max_rows=2, streams=True, stop=[stop], **opts)
    assert_alone(pipe, imgs, prompts, got, stop=[stop], **opts)
    assert got[2].finish_reason == "stop"
    assert [pieces.get(i, "") for i in range(5)] == [r.text for r in got]


def test_every_sequence_decodes_with_its_own_options(ckpt_factory):
    """One live batch whose rows differ in every option: lengths, min_new_tokens, a stop string, a repetition
    penalty, and sampling whose filters leave one token (top_k=1; top_p tiny; min_p=1 with a temperature), which
    makes the draw certain. Each answer is `generate`'s alone with the same options; the choice is fused into the
    step only while every row is greedy without a penalty. Seeded samples and beams are refused."""
    pipe = palitorch.load(diverse(ckpt_factory, 1)[0])
    own = [{"max_new_tokens": 5}, {"max_new_tokens": 30, "min_new_tokens": 12}, {"max_new_tokens": 12},
           {"max_new_tokens": 20}, {"max_new_tokens": 16, "repetition_penalty": 1.4},
           {"max_new_tokens": 14, "temperature": 0.7, "top_k": 1}, {"max_new_tokens": 9, "top_p": 1e-6},
           {"max_new_tokens": 11, "temperature": 1.3, "min_p": 1.0}]
    imgs, prompts = images(len(own)), (ASKS * 2)[:len(own)]
    own[3]["stop"] = [pipe.generate(imgs[3], prompts[3], **own[3]).text[6:9]]
    fused, unfused = [], []  # per step: were all the rows greedy without a penalty?

    def plain_rows() -> bool:
        return all(not GenerationOptions(**own[q.tag]).do_sample and "repetition_penalty" not in own[q.tag]
                   for q in live.active)

    def spy(step, calls):
        return lambda *args: calls.append(plain_rows()) or step(*args)

    with pipe.live(max_rows=4) as live:
        live.fns = dataclasses.replace(live.fns, greedy=spy(live.fns.greedy, fused),
                                       logits=spy(live.fns.logits, unfused))
        results, waiting = {}, list(range(len(own)))
        while waiting or live.active:
            if waiting and live.free_rows:
                i = waiting.pop(0)
                _, events = live.admit([imgs[i]], [prompts[i]], tags=[i], options=[GenerationOptions(**own[i])])
                results.update({q.tag: item for q, item in events if not isinstance(item, str)})
            results.update({q.tag: item for q, item in live.step() if not isinstance(item, str)})
        for bad in ({"temperature": 1.0, "seed": 1}, {"num_beams": 2}):
            with pytest.raises(InputError):
                live.admit([imgs[0]], [prompts[0]], options=[GenerationOptions(**bad)])
    for i in range(len(own)):
        want = pipe.generate(imgs[i], prompts[i], **own[i])
        assert (results[i].token_ids, results[i].text, results[i].finish_reason) == \
            (want.token_ids, want.text, want.finish_reason), own[i]
        torch.testing.assert_close(torch.tensor(results[i].logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)
    assert [len(results[i].token_ids) for i in range(3)] == [5, 30, 12] and results[3].finish_reason == "stop"
    assert results[4].token_ids != pipe.generate(imgs[4], prompts[4], max_new_tokens=16).token_ids  # the penalty
    assert fused and all(fused) and unfused and not any(unfused)  # fused exactly while every row is plain greedy


def test_sampled_rows_and_refusals():
    """Sampling without a seed runs row by row; a seeded sample or beams are refused; a prompt over the context is
    refused without disturbing the sequences already decoding; no more rows than max_rows are taken; admitting
    nothing starts nothing at once."""
    pipe = palitorch.load()
    img = images(1)[0]
    got, _, _ = run_live(pipe, [img] * 4, ["caption en"] * 4, [0, 0, 1, 2], max_rows=4, temperature=1.0,
                         max_new_tokens=8, min_new_tokens=8)
    assert all(len(r.token_ids) == 8 for r in got) and len({tuple(r.token_ids) for r in got}) > 1
    for bad in ({"temperature": 1.0, "seed": 1}, {"num_beams": 2}):
        with pytest.raises(InputError):
            with pipe.live(**bad):
                pass
    want = pipe.generate(img, "caption en", max_new_tokens=12, min_new_tokens=12)
    with pipe.live(max_rows=2, max_new_tokens=12, min_new_tokens=12) as live:
        [q], _ = live.admit([img], ["caption en"])
        live.step()
        with pytest.raises(InputError, match="context"):
            live.admit([img], ["caption en " * 600])
        assert live.admit([img] * 2, ["caption en"] * 2) is None  # one row left
        assert live.admit([], []) == ([], [])  # nothing to start: not "try again" (a caller's retry loop never ends)
        with pytest.raises(InputError, match="cannot join a live batch of max_rows=2"):  # (None: wait forever)
            live.admit([img] * 3, ["caption en"] * 3)
        assert live.free_rows == 1
        with pytest.raises(InputError, match="stream"):
            pipe.generate(img, "caption en")  # the live batch owns the caches
        while not q.over:
            events = live.step()
    assert events[-1][1].token_ids == want.token_ids


def test_a_compiled_pipeline_serves_a_live_batch():
    """The compiled step at batch sizes 1 and 2 (the rows grow and shrink): the answers of eager `generate`."""
    pipe = palitorch.load()
    imgs = images(4)
    prompts = ["caption en", "answer en what color is the shape?", "detect circle", "caption en"]
    opts = {"max_new_tokens": 10, "min_new_tokens": 3}
    want = [pipe.generate(i, p, **opts) for i, p in zip(imgs, prompts)]
    pipe.compile()
    got, _, log = run_live(pipe, imgs, prompts, [0, 2, 4, 20], max_rows=3, **opts)  # compiled: rows 1 or 2
    assert set(log["rows"]) == {1, 2}
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_live_batch_matches_cpu():
    """On a GPU (run where one is lent): the bundled model under `compile(mode="reduce-overhead")` (CUDA graphs,
    whose outputs the next step overwrites; caches reallocated as the batch grows and shrinks) decodes a live batch,
    joins at several steps, greedy and certain-draw sampled rows mixed: the tokens `generate` gives alone on CPU."""
    cpu = palitorch.load()
    imgs, prompts = images(6), (ASKS * 2)[:6]
    own = [{}, {"temperature": 0.8, "top_k": 1}, {}, {"min_new_tokens": 12}, {}, {"top_p": 1e-6}]
    want = [cpu.generate(i, p, max_new_tokens=24, **o) for i, p, o in zip(imgs, prompts, own)]
    pipe = palitorch.load(device="cuda").compile(mode="reduce-overhead")
    for _ in range(2):  # the first run records the graphs, the second replays them
        results, waiting, step = {}, list(range(6)), 0
        with pipe.live(max_rows=4) as live:
            while waiting or live.active:
                if waiting and live.free_rows and step % 2 == 0:
                    i = waiting.pop(0)
                    _, events = live.admit([imgs[i]], [prompts[i]], tags=[i],
                                           options=[GenerationOptions(max_new_tokens=24, **own[i])])
                    results.update({q.tag: r for q, r in events if not isinstance(r, str)})
                results.update({q.tag: r for q, r in live.step() if not isinstance(r, str)})
                step += 1
        assert [results[i].token_ids for i in range(6)] == [w.token_ids for w in want]
