"""The engine behind a live server: concurrent greedy requests are batched (and answered as one at a time), a bad
request in a batch fails alone, seeded samples run alone, a stream whose client leaves is cancelled.

Each test holds the engine until all its requests wait in the queue (`RecordingEngine(start_after=k)`), so what
is batched with what never depends on timing."""

import json
import socket
import struct
import threading
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from serverkit import (
    COMPLETIONS,
    TIMEOUT,
    HeldPipe,
    RecordingEngine,
    ask_all,
    chat,
    demo_examples,
    new_server,
    post,
    serving,
    stream_events,
)

import palitorch
from palitorch.server.engine import Engine


@pytest.fixture(scope="module")
def ref():
    """The expected answers: the bundled model, one request at a time, on the test's thread."""
    return palitorch.load()


@pytest.fixture(scope="module")
def demo():
    return demo_examples()


def text(answer) -> str:
    status, out, _ = answer
    assert status == 200, out
    [choice] = out["choices"]
    return choice["message"]["content"]


def test_concurrent_greedy_requests_are_batched_and_answered_as_one_at_a_time(ref, demo):
    asks = [(e, p) for e in demo for p in ("answer en " + e["question"], e["detect"])]  # 12 requests
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=len(asks), max_batch=8)
    answers = ask_all(engine, [chat(e["path"], p) for e, p in asks])
    for (e, prompt), answer in zip(asks, answers):
        assert text(answer) == ref.generate(e["image"], prompt).text, prompt
    [(options, admits)] = pipe.lives  # one continuous batch: 8 rows at first, the others as rows freed up
    assert options == {} and admits[0] == 8 and sum(admits) == 12 and not pipe.calls
    assert engine.stats["requests"] == 12 and engine.stats["batches"] == 1 and engine.stats["largest_batch"] == 8


def test_a_request_arriving_mid_batch_joins_it_and_ends_first(ref, demo):
    """A short request sent while a long one decodes joins the running batch and is answered while the long one
    is still decoding (not after it, as a batch run to its end would have it wait)."""
    pipe = HeldPipe(palitorch.load())
    engine = RecordingEngine(pipe, start_after=1)
    long_body = chat(demo[0]["path"], "endless", stream=True)
    streamed = {}
    with serving(new_server(engine)) as srv:
        pipe.release.set()
        streaming = threading.Thread(target=lambda: streamed.update(events=stream_events(srv, long_body)[1]),
                                     daemon=True)
        streaming.start()
        engine.wait_for_jobs(1)
        [long_job] = engine.jobs
        assert long_job.pieces.get(timeout=TIMEOUT) == (0, "more ")  # it is decoding (choice 0)
        short = post(srv, chat(demo[1]["path"], "caption en"))
        assert text(short) == ref.generate(demo[1]["image"], "caption en").text
        assert not long_job.done.is_set()  # answered while the long one still runs
        [(_, admits)] = pipe.lives
        assert admits == [1, 1]
        long_job.cancelled.set()  # the long one's client leaves: its row is released, the batch ends
        assert pipe.closed.wait(TIMEOUT) and long_job.done.wait(TIMEOUT)
        streaming.join(TIMEOUT)  # a stream cancelled while its client still listens ends cleanly (it got a
        events = streamed["events"]  # second status line, a 500 for job.results[0] of None, before session 14)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
    engine.stop()


PACED = ["caption en", "answer en what color is the shape?"]


@contextmanager
def two_held_by_the_pacer(demo):
    """A stream decoding (400 tokens) and two requests (PACED, about demo images 1 and 2) that arrived while it runs,
    taken from the queue and held back by the pacer while `holding` is set -> a namespace of pipe, engine, holding,
    long_job, askers (their threads) and answers. The long stream is cancelled at the end."""
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=1)
    holding = threading.Event()
    holding.set()
    engine.pacer.hold = lambda rows, waited_s: holding.is_set()
    long_body = chat(demo[0]["path"], "caption en", stream=True, max_tokens=400, min_tokens=400)  # a running row
    answers = [None, None]

    def ask(i):
        answers[i] = post(srv, chat(demo[1 + i]["path"], PACED[i]))

    with serving(new_server(engine)) as srv:
        threading.Thread(target=lambda: stream_events(srv, long_body), daemon=True).start()
        engine.wait_for_jobs(1)
        [long_job] = engine.jobs
        assert long_job.pieces.get(timeout=TIMEOUT)  # it is decoding
        askers = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in askers:
            t.start()
        engine.wait_for_jobs(2)
        for _ in range(3):  # the batch decodes on while both requests wait
            long_job.pieces.get(timeout=TIMEOUT)
        yield SimpleNamespace(pipe=pipe, engine=engine, holding=holding, long_job=long_job, askers=askers,
                              answers=answers)
        long_job.cancelled.set()
        assert long_job.done.wait(TIMEOUT)
    engine.stop()


def test_requests_held_back_by_the_pacer_join_in_one_admission(ref, demo):
    """While the pacer holds (the running rows expected to end before an admission would), requests that arrive
    wait and the batch decodes on; once it lets them in they join in one admission, and each gets its
    one-at-a-time answer."""
    with two_held_by_the_pacer(demo) as h:
        [(_, admits)] = h.pipe.lives
        assert admits == [1] and not h.long_job.done.is_set()
        h.holding.clear()
        for t in h.askers:
            t.join(TIMEOUT)
        for i in range(2):
            assert text(h.answers[i]) == ref.generate(demo[1 + i]["image"], PACED[i]).text
        assert admits == [1, 2]


def test_a_request_held_back_by_the_pacer_whose_client_leaves_never_joins(ref, demo):
    """A request waiting for the pacer to let it in, whose client then leaves, is dropped before the admission: only
    the other one joins (it was admitted and decoded for a step before its row was freed)."""
    with two_held_by_the_pacer(demo) as h:
        gone = h.engine.jobs[1]
        gone.cancelled.set()  # its client leaves
        h.holding.clear()
        stay = PACED.index(h.engine.jobs[2].request.prompt)
        h.askers[stay].join(TIMEOUT)
        assert text(h.answers[stay]) == ref.generate(demo[1 + stay]["image"], PACED[stay]).text
        [(_, admits)] = h.pipe.lives
        assert admits == [1, 1] and gone.done.wait(TIMEOUT) and gone.results is None
        h.askers[1 - stay].join(TIMEOUT)


def test_a_bad_request_in_a_batch_fails_alone(ref, demo):
    e, other = demo[0], demo[3]
    bodies = [chat(e["path"], "caption en"), chat(other["path"], "a " * 600),  # over the model's context
              chat(other["path"], "answer en " + other["question"]), chat(e["path"], e["detect"], n=2)]
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=len(bodies))
    good, bad, answer, detect = ask_all(engine, bodies)
    status, out, _ = bad
    assert status == 400 and "context of 512" in out["error"]["message"] and out["error"]["param"] == "messages", out
    assert text(good) == ref.generate(e["image"], "caption en").text
    assert text(answer) == ref.generate(other["image"], "answer en " + other["question"]).text
    status, out, _ = detect
    assert status == 200 and [c["message"]["content"] for c in out["choices"]] == \
        [ref.generate(e["image"], e["detect"]).text] * 2
    [(_, admits)] = pipe.lives
    assert admits == [4, 1, 1, 1, 1]  # refused as a whole, then each request alone; the others joined
    assert engine.stats["largest_batch"] == 3 and engine.stats["requests"] == 4


def test_requests_with_any_options_share_a_live_batch_but_seeded_ones(ref, demo):
    """Greedy requests with their own max_tokens, min_tokens and stop strings, and a sampled one, share one live
    batch, each answered as alone with its own options; a seeded sample (queued last) runs alone."""
    a, b, c, d, e, f = demo[:6]
    lengths = [{}, {"max_tokens": 1}, {"stop": ["<loc"]}, {"max_tokens": 4, "min_tokens": 4}]
    bodies = [chat(x["path"], x["detect"], **kw) for x, kw in zip((a, b, c, f), lengths)] + \
        [chat(d["path"], "caption en", temperature=1.5, seed=3), chat(e["path"], "caption en", temperature=0.5)]
    bodies[4], bodies[5] = bodies[5], bodies[4]
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=len(bodies))
    answers = ask_all(engine, bodies, in_order=True)
    answers[4], answers[5] = answers[5], answers[4]
    [(options, admits)] = pipe.lives
    assert options == {} and admits == [5]  # four greedy rows and the sampled one, each with its own options
    assert (pipe.calls, pipe.options) == ([1], [{"temperature": 1.5, "seed": 3}])
    ours = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "stop": "stop"}
    for x, kw, answer in zip((a, b, c, f), lengths, answers):
        want = ref.generate(x["image"], x["detect"], **{ours[k]: v for k, v in kw.items()})
        assert text(answer) == want.text, kw
        assert answer[1]["choices"][0]["finish_reason"] == ("stop" if want.finish_reason != "length" else "length")
    assert answers[1][1]["usage"]["completion_tokens"] == 1 and answers[3][1]["usage"]["completion_tokens"] == 4
    # a seed gives the sample it gives alone, whatever else is waiting
    assert text(answers[4]) == ref.generate(d["image"], "caption en", temperature=1.5, seed=3).text


def test_no_request_overtakes_a_seeded_one_queued_before_it(ref, demo):
    """Arrival order: of four requests queued while the model was busy, the two before a seeded sample form the first
    batch, the seeded one runs alone after it, and the one behind it waits for it, in a batch of its own (before, it
    joined the first batch, ahead of the seeded one)."""
    a, b, c, d = demo[:4]
    bodies = [chat(a["path"], a["detect"]), chat(b["path"], b["detect"]),
              chat(c["path"], "caption en", temperature=1.5, seed=3), chat(d["path"], d["detect"])]
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=len(bodies))
    answers = ask_all(engine, bodies, in_order=True)
    assert [admits for _, admits in pipe.lives] == [[2], [1]] and pipe.calls == [1]
    for x, answer in zip((a, b, d), (answers[0], answers[1], answers[3])):
        assert text(answer) == ref.generate(x["image"], x["detect"]).text
    assert text(answers[2]) == ref.generate(c["image"], "caption en", temperature=1.5, seed=3).text


def test_a_client_that_leaves_a_stream_cancels_it(ref, demo):
    pipe = HeldPipe(palitorch.load())  # its stream of the prompt "endless" ends only when closed
    engine = RecordingEngine(pipe, start_after=1)
    body = json.dumps(chat(demo[0]["path"], "endless", stream=True)).encode()
    with serving(new_server(engine)) as srv:
        sock = socket.create_connection(srv.server_address[:2], timeout=TIMEOUT)
        sock.sendall(b"POST " + COMPLETIONS.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while got.count(b"more") < 2:  # the stream is running
            data = sock.recv(65536)
            assert data, got
            got += data
        assert got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # leave at once (a reset)
        sock.close()
        assert pipe.closed.wait(TIMEOUT), "the engine went on generating for a client that had left"
        [job] = engine.jobs
        assert job.done.wait(TIMEOUT) and job.cancelled.is_set() and job.error is None
        # the server goes on answering, streams included
        pipe.release.set()
        expected = ref.generate(demo[1]["image"], "caption en").text
        assert text(post(srv, chat(demo[1]["path"], "caption en"))) == expected
        _, events = stream_events(srv, chat(demo[1]["path"], "caption en", stream=True))
        assert events[-1] == "[DONE]"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[1:-1]) == expected
    engine.stop()


def test_requests_that_send_the_same_image_share_its_vision_pass(ref, demo):
    """Three questions about one image (sent three times, as three data URLs) and one about another: one batch, in
    which the vision tower encodes two images, not four; the answers are those of one request at a time."""
    pipe = palitorch.load()
    encoded = []
    pipe.model.vision_tower.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    engine = RecordingEngine(pipe, start_after=4)
    prompts = ["caption en", "answer en what color is the shape?", "detect " + demo[0]["answer"]]
    bodies = [chat(demo[0]["path"], p) for p in prompts] + [chat(demo[1]["path"], "caption en")]
    answers = ask_all(engine, bodies)
    assert encoded == [2] and engine.stats["largest_batch"] == 4
    expected = [ref.generate(demo[0]["image"], p).text for p in prompts] + [ref.generate(demo[1]["image"],
                                                                                         "caption en").text]
    assert [text(a) for a in answers] == expected


def test_streams_are_batched_with_each_other_and_with_plain_requests(ref, demo):
    """Three streams and one plain request, all greedy with the same options: one batch. Each stream's pieces make
    the answer it gets alone, and ends with its finish chunk and [DONE]; the plain request's answer is as alone."""
    engine = RecordingEngine(palitorch.load(), start_after=4)
    examples = demo[:4]
    bodies = [chat(e["path"], "answer en " + e["question"], stream=i < 3) for i, e in enumerate(examples)]
    results = ask_all(engine, bodies)
    assert engine.stats["batches"] == 1 and engine.stats["largest_batch"] == 4
    expected = [ref.generate(e["image"], "answer en " + e["question"]) for e in examples]
    for i in range(3):
        kind, events = results[i]
        assert kind == "text/event-stream" and events[-1] == "[DONE]"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == expected[i].text
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert text(results[3]) == expected[3].text


def test_a_bad_stream_in_a_batch_fails_alone(ref, demo):
    """A stream whose prompt is over the context, batched with a good stream and a plain request: the batch is
    refused before anything is sent, then each runs alone; only the bad one gets the (ordinary, non-stream) 400."""
    e, other = demo[0], demo[3]
    bodies = [chat(e["path"], "caption en", stream=True), chat(other["path"], "a " * 600, stream=True),
              chat(other["path"], "caption en")]
    engine = RecordingEngine(palitorch.load(), start_after=len(bodies))
    answers = ask_all(engine, bodies)
    status, out = answers[1]
    assert status == 400 and "context of 512" in out["error"]["message"], out
    _, events = answers[0]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == \
        ref.generate(e["image"], "caption en").text
    assert text(answers[2]) == ref.generate(other["image"], "caption en").text
    assert engine.stats["largest_batch"] == 2  # the two good ones


def test_sampled_requests_without_a_seed_share_a_batch_row_by_row(demo):
    """Two sampled requests without a seed (one with n = 3) and a stream with the same options: one batch of five
    rows; each request gets its n answers; a seeded sampled request with the same options (queued last) still runs
    alone."""
    opts = {"temperature": 1.5, "top_k": 40}
    bodies = [chat(demo[0]["path"], "caption en", n=3, **opts), chat(demo[1]["path"], "caption en", **opts),
              chat(demo[2]["path"], "caption en", stream=True, **opts),
              chat(demo[3]["path"], "caption en", seed=5, **opts)]
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=len(bodies), max_batch=8)
    results = ask_all(engine, bodies, in_order=True)
    assert pipe.calls == [1] and [admits for _, admits in pipe.lives] == [[5]]  # the seeded alone; 5 rows, 1 batch
    assert engine.stats["batches"] == 2 and engine.stats["largest_batch"] == 3
    for i, n in ((0, 3), (1, 1), (3, 1)):
        status, out, _ = results[i]
        assert status == 200 and len(out["choices"]) == n and all(c["message"]["content"] for c in out["choices"])
    _, events = results[2]
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_request_wanting_more_rows_than_a_batch_has_runs_alone(demo):
    """n sampled answers take n rows; with n above --max-batch-size the request cannot join a live batch, so it
    runs alone as one batch of n rows (as a seeded one does), and is answered."""
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=1, max_batch=2)
    [(status, out, _)] = ask_all(engine, [chat(demo[0]["path"], "caption en", temperature=1.0, n=3)])
    assert status == 200 and len(out["choices"]) == 3
    assert pipe.calls == [3] and [admits for _, admits in pipe.lives] == [[]]


def test_a_beam_search_between_live_batches_leaves_their_caches_alone(ref, demo):
    """A beam search (which runs alone) between live batches, even with more beams than the batch has rows: the
    live batch's pooled caches keep their shape, and every request is answered as alone (an audit found every
    later request failing with a cache shape error)."""
    e = demo[0]
    engine = Engine(palitorch.load(), max_batch=2).start()
    try:
        with serving(new_server(engine)) as server:
            for beams in (2, 3, 1):
                for prompt, kw in (("caption en", {}), (e["detect"], {"num_beams": beams})):
                    status, out, _ = post(server, chat(e["path"], prompt, **kw))
                    assert status == 200, out
                    want = ref.generate(e["image"], prompt, **kw)
                    assert out["choices"][0]["message"]["content"] == want.text
    finally:
        engine.stop()


def test_a_bug_that_one_input_meets_fails_only_its_request(ref, demo, monkeypatch):
    """An unexpected exception while one request joins a live batch (here injected into the prompt's encoding) is
    that request's 500; the requests batched with it are answered."""
    e, other = demo[0], demo[3]
    pipe = HeldPipe(palitorch.load(), released=True)
    encode = pipe.processor.encode

    def faulty(prefix, suffix=None):
        if "boom" in prefix:
            raise RuntimeError("injected fault")
        return encode(prefix, suffix)

    monkeypatch.setattr(pipe.processor, "encode", faulty)
    bodies = [chat(e["path"], "caption en"), chat(other["path"], "caption en boom"),
              chat(other["path"], "answer en " + other["question"])]
    engine = RecordingEngine(pipe, start_after=len(bodies))
    good, broken, answer = ask_all(engine, bodies)
    status, out, _ = broken
    assert status == 500 and "injected fault" in out["error"]["message"], out
    assert text(good) == ref.generate(e["image"], "caption en").text
    assert text(answer) == ref.generate(other["image"], "answer en " + other["question"]).text


def test_static_batching_batches_only_requests_with_the_same_options(ref, demo):
    """`continuous=False` (bench_serve's static mode) runs one padded batch with one set of options: requests with
    other options wait for a batch of their own, and each answer is the one its own options give alone."""
    a, b, c = demo[:3]
    bodies = [chat(a["path"], a["detect"]), chat(b["path"], b["detect"], max_tokens=2), chat(c["path"], c["detect"])]
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=len(bodies), continuous=False)
    answers = ask_all(engine, bodies)
    # (the batch taken first is that of the request that reached the queue first: the threads race for that)
    batches = sorted(zip(pipe.calls, [sorted(o.items()) for o in pipe.options]))
    assert batches == [(1, [("max_new_tokens", 2)]), (2, [])] and not pipe.lives
    for x, kw, answer in zip((a, b, c), ({}, {"max_new_tokens": 2}, {}), answers):
        assert text(answer) == ref.generate(x["image"], x["detect"], **kw).text, kw


def test_a_sampled_stream_of_n_answers_sends_each_row_under_its_own_index(demo):
    """n sampled answers streamed from a live batch: each of its n rows' pieces and finishing chunk come under that
    row's choice index (0 .. n-1), once each, and each index's pieces join into a text of its own."""
    body = chat(demo[0]["path"], "caption en", stream=True, n=3, temperature=1.5, max_tokens=12)
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=1, max_batch=4)
    [(_, events)] = ask_all(engine, [body])
    assert [admits for _, admits in pipe.lives] == [[3]]  # three rows of one live batch
    finished, texts = [], {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
            if choice["finish_reason"] is not None:
                finished.append(choice["index"])
    assert sorted(finished) == [0, 1, 2] and all(texts.get(i) for i in range(3)), (finished, texts)
