"""The official `openai` Python client against a live server: its typed objects parse what the server sends, and
what an audit with the client found (fields OpenAI documents as always present, tokens that join into the
content, request ids, newer bookkeeping parameters, a client that gives up on a whole answer) holds."""

import json
import socket
import struct
import time
import urllib.request

import openai
import pytest
from serverkit import (
    COMPLETIONS,
    MODEL,
    HeldPipe,
    RecordingEngine,
    chat,
    data_url,
    demo_examples,
    live_server,
    new_server,
    post,
    serving,
)

import palitorch


@pytest.fixture(scope="module")
def demo():
    return demo_examples()


@pytest.fixture(scope="module")
def server():
    with live_server() as srv:
        yield srv


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, **kw)


def messages(example, prompt: str) -> list:
    return chat(example["path"], prompt)["messages"]


def test_a_completion_with_logprobs_parses_and_its_tokens_join_into_the_content(server, demo):
    e = demo[1]
    raw = client(server).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages(e, "caption en"), logprobs=True, top_logprobs=2,
        safety_identifier="user-1", prompt_cache_key="k")  # bookkeeping OpenAI asks for instead of `user`
    out = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_") and out._request_id == raw.headers["x-request-id"]
    [choice] = out.choices
    assert choice.message.content and choice.message.refusal is None and choice.logprobs.refusal is None
    tokens = choice.logprobs.content
    assert tokens[0].token[:1] != " "  # the decoder drops the first word mark from the text: the token too
    assert "".join(t.token for t in tokens) == choice.message.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == choice.message.content
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    assert out.usage.completion_tokens == len(tokens) + 1  # and the EOS
    again = client(server).chat.completions.with_raw_response.create(model=MODEL, messages=messages(e, "caption en"))
    assert again.headers["x-request-id"] != raw.headers["x-request-id"]


def test_a_stream_parses_with_usage_null_until_the_last_chunk(server, demo):
    e = demo[2]
    chunks = list(client(server).chat.completions.create(
        model=MODEL, messages=messages(e, "caption en"), stream=True, logprobs=True,
        stream_options={"include_usage": True, "include_obfuscation": False}))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens >= 1
    pieces = [c.choices[0] for c in chunks[:-1]]
    text = "".join(p.delta.content or "" for p in pieces)
    tokens = [t for p in pieces if p.logprobs for t in p.logprobs.content]
    assert text and "".join(t.token for t in tokens) == text
    assert pieces[-1].finish_reason == "stop"


def test_errors_are_the_client_s_exceptions(server, demo):
    with pytest.raises(openai.BadRequestError) as bad:
        client(server).chat.completions.create(model=MODEL, messages=messages(demo[0], "caption en"), top_p=0)
    assert bad.value.body["param"] == "top_p" and bad.value.request_id.startswith("req_")
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4o", messages=messages(demo[0], "caption en"))
    assert [m.id for m in client(server).models.list()] == [MODEL]


def test_an_api_key_s_scheme_is_case_insensitive_and_a_401_says_how_to_authenticate(demo):
    with live_server(api_key="s3cret") as srv:
        assert client(srv).with_options(api_key="s3cret").models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError) as denied:
            client(srv).models.list()  # "Bearer none"
        assert denied.value.response.headers["WWW-Authenticate"] == "Bearer"
        lower = urllib.request.Request(srv.url + "/v1/models", headers={"Authorization": "bearer s3cret"})
        with urllib.request.urlopen(lower) as r:
            assert r.status == 200


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_row(demo):
    """A request that is not streamed, whose client times out (and would retry, in an SDK), is cancelled: the
    engine stops decoding it rather than spend a row on an answer no one reads."""
    pipe = HeldPipe(palitorch.load())  # the prompt "endless" decodes until its row is released
    engine = RecordingEngine(pipe, start_after=1)
    with serving(new_server(engine)) as srv:
        with pytest.raises(openai.APITimeoutError):
            client(srv, timeout=1.0).chat.completions.create(model=MODEL, messages=messages(demo[0], "endless"))
        assert pipe.closed.wait(30), "the engine went on generating for a client that had left"
        [job] = engine.jobs
        assert job.done.wait(30) and job.cancelled.is_set() and job.results is None
        # a client whose connection is reset is dropped too; the server answers on
        data = json.dumps(chat(demo[0]["path"], "endless")).encode()
        pipe.closed.clear()
        sock = socket.create_connection(srv.server_address[:2], timeout=30)
        sock.sendall(b"POST " + COMPLETIONS.encode() + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        engine.wait_for_jobs(2)
        while engine.jobs[1].started_at is None:  # in the batch, decoding
            time.sleep(0.01)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # leave at once (a reset)
        sock.close()
        assert pipe.closed.wait(30) and engine.jobs[1].done.wait(30) and engine.jobs[1].cancelled.is_set()
        pipe.release.set()
        out = client(srv).chat.completions.create(model=MODEL, messages=messages(demo[1], "caption en"))
        assert out.choices[0].message.content == palitorch.load().generate(demo[1]["image"], "caption en").text
    engine.stop()


def test_a_stream_whose_client_gives_up_while_queued_is_dropped_unanswered(demo):
    """A streamed request waits for its first piece before its status line goes out; a client that times out then
    (an SDK's timeout while the request waits in the queue, before it retries) is cancelled at once, as a whole
    answer's is, and the engine drops it from the queue rather than decode it for no one."""
    pipe = HeldPipe(palitorch.load(), released=True)
    engine = RecordingEngine(pipe, start_after=2)  # the model waits for a second request: the first stays queued
    with serving(new_server(engine)) as srv:
        with pytest.raises(openai.APITimeoutError):
            for _ in client(srv, timeout=1.0).chat.completions.create(
                    model=MODEL, messages=messages(demo[0], "caption en"), stream=True):
                pass
        [job] = engine.jobs
        assert job.cancelled.wait(10), "a stream's client left while it was queued, and its job stayed wanted"
        out = client(srv).chat.completions.create(model=MODEL, messages=messages(demo[1], "caption en"))
        assert out.choices[0].message.content == palitorch.load().generate(demo[1]["image"], "caption en").text
        assert job.done.wait(30) and job.results is None
        assert [rows for _, admits in pipe.lives for rows in admits] == [1]  # only the second request was decoded
    engine.stop()


def test_the_hang_up_check_works_past_select_s_descriptor_limit():
    """select() refuses descriptors from 1024 on (a busy server has them), which counted as a hang-up: every
    non-streamed request on such a connection was dropped after a quarter second. The check must read the socket."""
    import fcntl
    import resource

    from palitorch.server.sockets import peer_closed

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("the descriptor limit is under 1200 here")
    a, b = socket.socketpair()
    high = socket.socket(fileno=fcntl.fcntl(a.fileno(), fcntl.F_DUPFD, 1100))  # the first free one from 1100
    try:
        assert not peer_closed(high)  # connected, nothing sent
        b.sendall(b"GET / HTTP/1.1\r\n")  # a pipelined request is no hang-up
        assert not peer_closed(high)
        b.close()
        assert peer_closed(high) is False  # its bytes still wait to be read ...
        high.recv(100)
        assert peer_closed(high)  # ... then the end of the stream
    finally:
        high.close()
        a.close()


def test_n_choices_of_a_beam_search_are_its_best_beams(server, demo):
    e = demo[0]
    out = client(server).chat.completions.create(model=MODEL, messages=messages(e, "caption en"), n=3,
                                                 extra_body={"num_beams": 3}, logprobs=True)
    want = palitorch.load().generate(e["image"], "caption en", num_beams=3).beams
    assert [c.message.content for c in out.choices] == [b.text for b in want]
    assert [len(c.logprobs.content) for c in out.choices] == [len(b.token_ids) for b in want]
    assert len({c.message.content for c in out.choices}) > 1  # (not the best one three times)


def test_a_message_with_several_images_asks_about_them_all(server, demo):
    """Image parts in order are the prompt's images (as `generate([[a, b]], prompt)`), streamed or not; boxes of a
    detect prompt about several images are in no one image's pixels, so no detections field comes."""
    a, b = demo[0], demo[2]
    images = [{"type": "image_url", "image_url": {"url": data_url(e["path"])}} for e in (a, b)]

    def ask(parts, prompt):
        return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]

    question = "answer en is the shape red?"
    want = palitorch.load().generate([[a["image"], b["image"]]], [question])[0]
    out = client(server).chat.completions.create(model=MODEL, messages=ask(images, question))
    assert out.choices[0].message.content == want.text and out.usage.prompt_tokens == want.prompt_tokens
    pieces = client(server).chat.completions.create(model=MODEL, messages=ask(images, question), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == want.text
    status, two, _ = post(server, {"messages": ask(images, "detect red")})
    assert status == 200 and "detections" not in two["choices"][0]
    assert "detections" in post(server, {"messages": ask(images[:1], "detect red")})[1]["choices"][0]
