"""What a live server answers: the same as `Pipeline.generate` (text, logprobs, detections), as one object or as a
stream of server-sent events; n choices; image URLs fetched; the model list and health."""

import functools
import socketserver
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from serverkit import ASSETS, MODEL, call, chat, demo_examples, live_server, new_server, post, serving, stream_events

import palitorch


@pytest.fixture(scope="module")
def ref():
    """The expected answers: the bundled model, one request at a time, on the test's thread."""
    return palitorch.load()


@pytest.fixture(scope="module")
def demo():
    return demo_examples()


@pytest.fixture(scope="module")
def server():
    with live_server(fetch_private=True) as srv:  # its tests fetch images from a site on 127.0.0.1
        yield srv


def test_a_completion_is_what_generate_answers(server, ref, demo):
    for e in demo[:3]:
        for prompt in ("caption en", "answer en " + e["question"]):
            status, out, headers = post(server, chat(e["path"], prompt, model=MODEL))
            assert status == 200 and headers["Content-Type"] == "application/json", out
            expected = ref.generate(e["image"], prompt)
            assert out["object"] == "chat.completion" and out["model"] == MODEL and out["id"].startswith("chatcmpl-")
            [choice] = out["choices"]
            assert choice["message"] == {"role": "assistant", "content": expected.text, "refusal": None}
            assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
            assert out["usage"]["prompt_tokens"] == expected.prompt_tokens
            assert out["usage"]["completion_tokens"] == len(expected.token_ids) + 1  # and the EOS


def test_logprobs_are_generate_s(server, ref, demo):
    e = demo[0]
    status, out, _ = post(server, chat(e["path"], e["detect"], logprobs=True, max_tokens=3))
    assert status == 200, out
    expected = ref.generate(e["image"], e["detect"], max_new_tokens=3)
    [choice] = out["choices"]
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 3
    content = choice["logprobs"]["content"]
    assert len(content) == len(expected.logprobs) == 3
    assert all(abs(c["logprob"] - lp) < 1e-6 for c, lp in zip(content, expected.logprobs))
    assert "".join(c["token"] for c in content) == expected.text  # <locNNNN> tokens are text too


def test_top_logprobs_are_generate_s(server, ref, demo):
    e = demo[1]
    prompt = "answer en " + e["question"]
    status, out, _ = post(server, chat(e["path"], prompt, logprobs=True, top_logprobs=3, n=2))
    assert status == 200, out
    expected = ref.generate(e["image"], prompt, top_logprobs=3)
    for choice in out["choices"]:
        content = choice["logprobs"]["content"]
        assert len(content) == len(expected.top_logprobs) >= 1
        # the answer's first token reads as the text begins (the decoder drops its leading space), and so do its
        # step's alternatives: the chosen token is found among them by its text
        first = ref.processor.token_bytes(expected.token_ids[0])
        dropped = first.startswith(b" ") and not expected.text.startswith(" ")
        assert content[0]["token"] in [t["token"] for t in content[0]["top_logprobs"]]
        for k, (entry, alternatives) in enumerate(zip(content, expected.top_logprobs)):
            tokens = [ref.processor.token_bytes(i) for i, _ in alternatives]
            if k == 0 and dropped:
                tokens = [t.removeprefix(b" ") for t in tokens]
            assert [bytes(t["bytes"]) for t in entry["top_logprobs"]] == tokens
            # 1e-5: the server decodes the n choices as a batch of n rows, generate one row (float32 rounding)
            assert all(abs(t["logprob"] - lp) < 1e-5 for t, (_, lp) in zip(entry["top_logprobs"], alternatives))


@pytest.mark.parametrize("extra", [{}, {"top_logprobs": 2}, {"stop": [" "]}])  # " ": before the label
def test_a_stream_s_chunks_carry_the_logprobs_of_the_whole_answer(server, demo, extra):
    """Each chunk's entries are those of the tokens that brought its text (tokens without text of their own ride
    with the next chunk, or the finish chunk); in order, they are the non-streamed answer's, also when a stop string
    cuts the answer."""
    e = demo[2]
    body = chat(e["path"], e["detect"], logprobs=True, **extra)
    _, whole, _ = post(server, body)
    _, events = stream_events(server, body | {"stream": True})
    chunks = [c["choices"][0] for c in events[1:-1]]  # after the role chunk, up to [DONE]
    streamed = [entry for c in chunks if c["logprobs"] for entry in c["logprobs"]["content"]]
    expected = whole["choices"][0]["logprobs"]["content"]
    if "stop" in extra:  # cut before the label: only the box's <loc> tokens are left
        assert whole["choices"][0]["message"]["content"].count("<loc") == 4 and " " not in \
            whole["choices"][0]["message"]["content"]
    assert len(streamed) == len(expected) >= 1
    assert [s["token"] for s in streamed] == [x["token"] for x in expected]
    assert all(abs(s["logprob"] - x["logprob"]) < 1e-6 for s, x in zip(streamed, expected))
    assert [len(s["top_logprobs"]) for s in streamed] == [len(x["top_logprobs"]) for x in expected]
    assert sum(bool(c["delta"].get("content")) and c["logprobs"] is not None for c in chunks) >= 1
    assert "".join(c["delta"].get("content", "") for c in chunks) == whole["choices"][0]["message"]["content"]


def test_detect_prompts_carry_detections(server, ref, demo):
    e = demo[1]
    status, out, _ = post(server, chat(e["path"], e["detect"]))
    assert status == 200, out
    text = ref.generate(e["image"], e["detect"]).text
    [choice] = out["choices"]
    assert choice["message"]["content"] == text and text.endswith(e["detect"].split()[1])
    [det] = choice["detections"]
    assert det["label"] == e["detect"].split()[1] and len(det["box"]) == 4
    assert all(0 <= v <= 64 for v in det["box"])  # pixels of the 64x64 image
    _, events = stream_events(server, chat(e["path"], e["detect"], stream=True))  # a stream: on its finishing chunk
    finishing = [c["choices"][0] for c in events if c != "[DONE]" and c["choices"][0]["finish_reason"]]
    assert [c["detections"] for c in finishing] == [choice["detections"]]
    assert all("detections" not in c["choices"][0] for c in events[:-1] if c["choices"][0]["finish_reason"] is None)


def test_streaming_gives_the_same_text_as_server_sent_events(server, demo):
    e = demo[2]
    _, whole, _ = post(server, chat(e["path"], e["detect"]))
    kind, events = stream_events(server, chat(e["path"], e["detect"], stream=True,
                                              stream_options={"include_usage": True}))
    assert kind == "text/event-stream"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *pieces, finish, usage = chunks[1:]
    assert len(pieces) > 1  # the answer came in pieces
    assert "".join(p["choices"][0]["delta"]["content"] for p in pieces) == whole["choices"][0]["message"]["content"]
    assert all(p["choices"][0]["finish_reason"] is None for p in pieces)
    assert finish["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None,
                                    "detections": whole["choices"][0]["detections"]}
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # as OpenAI: null until the last


def test_a_stream_without_usage_and_a_stream_that_is_refused(server, demo):
    e = demo[0]
    _, events = stream_events(server, chat(e["path"], "caption en", stream=True))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in events[:-1])
    # an input the model refuses is an ordinary error response, before any event
    status, out, headers = post(server, chat(e["path"], "a " * 600, stream=True))
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert "context" in out["error"]["message"]


def test_a_bug_mid_stream_ends_the_stream_with_an_error_event(server, demo, monkeypatch, capsys):
    """Once a stream's status line is out, an internal error becomes its last event (not a second status line
    written into the stream), and the server goes on serving."""
    import palitorch.server.sse as sse

    def broken(result):
        raise RuntimeError("boom")

    monkeypatch.setattr(sse, "finish_reason", broken)
    _, events = stream_events(server, chat(demo[0]["path"], "caption en", stream=True))
    assert events[-1]["error"]["type"] == "server_error" and "boom" in events[-1]["error"]["message"]
    assert len(events) > 2 and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "RuntimeError: boom" in capsys.readouterr().err  # the server's log has the traceback
    monkeypatch.undo()
    assert post(server, chat(demo[0]["path"], "caption en"))[0] == 200


def test_ignore_eos_runs_to_max_tokens(server, demo):
    status, out, _ = post(server, chat(demo[0]["path"], "caption en", max_tokens=9, ignore_eos=True, n=2,
                                       temperature=1.0))
    assert status == 200, out
    assert [c["finish_reason"] for c in out["choices"]] == ["length", "length"]
    assert out["usage"]["completion_tokens"] == 18


def test_n_greedy_choices_are_alike(server, ref, demo):
    e = demo[3]
    status, out, _ = post(server, chat(e["path"], "caption en", n=3))
    assert status == 200, out
    expected = ref.generate(e["image"], "caption en")
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in out["choices"]] == [expected.text] * 3
    assert out["usage"]["completion_tokens"] == 3 * (len(expected.token_ids) + 1)


def test_n_samples_with_a_seed_are_reproducible(server, ref, demo):
    e = demo[4]
    body = chat(e["path"], e["detect"], n=3, temperature=1.5, seed=7)
    first, second = post(server, body)[1], post(server, body)[1]
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in second["choices"]]
    assert len(set(texts)) > 1  # three samples, not one answer copied
    expected = ref.generate([e["image"]] * 3, [e["detect"]] * 3, temperature=1.5, seed=7)
    assert texts == [r.text for r in expected]


def by_choice(events: list) -> dict[int, list[dict]]:
    """A stream's chunks (before [DONE], the usage chunk left out) grouped by their choice's index, in order."""
    out = {}
    for c in events[:-1]:
        for choice in c["choices"]:
            out.setdefault(choice["index"], []).append(choice)
    return out


@pytest.mark.parametrize("extra", [{}, {"temperature": 1.5, "seed": 7}])
def test_n_choices_stream_side_by_side(server, demo, extra):
    """With n > 1 a stream's chunks name their choice: each choice has its role chunk, pieces that make its answer,
    its logprobs, and one finishing chunk (greedy: n alike answers; seeded samples: the same as without a stream)."""
    e = demo[4]
    body = chat(e["path"], e["detect"], n=3, logprobs=True, top_logprobs=2, **extra)
    _, whole, _ = post(server, body)
    _, events = stream_events(server, body | {"stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    choices = by_choice(events[:-1])
    assert sorted(choices) == [0, 1, 2]
    for i, chunks in choices.items():
        expected = whole["choices"][i]
        assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in chunks[1:]] == [None] * (len(chunks) - 2) + [expected["finish_reason"]]
        assert "".join(c["delta"].get("content", "") for c in chunks) == expected["message"]["content"]
        streamed = [entry for c in chunks if c["logprobs"] for entry in c["logprobs"]["content"]]
        assert [(s["token"], len(s["top_logprobs"])) for s in streamed] == \
            [(x["token"], len(x["top_logprobs"])) for x in expected["logprobs"]["content"]]
        assert chunks[-1]["detections"] == expected["detections"]
    if extra:
        assert len({c["message"]["content"] for c in whole["choices"]}) > 1  # three samples, not one copied


def test_n_unseeded_samples_stream_in_a_live_batch(server, demo):
    """Unseeded samples decode as rows of a live batch: each choice's pieces still add up to an answer that ends
    once, and the usage counts every choice's tokens."""
    e = demo[3]
    body = chat(e["path"], "caption en", n=2, temperature=1.0, max_tokens=6, logprobs=True, stream=True,
                stream_options={"include_usage": True})
    _, events = stream_events(server, body)
    choices = by_choice(events[:-1])
    assert sorted(choices) == [0, 1]
    tokens = 0
    for chunks in choices.values():
        assert sum(c["finish_reason"] is not None for c in chunks) == 1 and chunks[-1]["finish_reason"]
        tokens += sum(len(c["logprobs"]["content"]) for c in chunks if c["logprobs"])
        tokens += chunks[-1]["finish_reason"] == "stop"  # (no stop strings: an EOS, counted but not in the text)
    assert tokens == events[-2]["usage"]["completion_tokens"] > 0


@pytest.fixture(scope="module")
def image_site():
    """A local web server with the demo images; GET of anything else is a 404."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(ASSETS)))
    with serving(site):
        yield f"http://127.0.0.1:{site.server_address[1]}"


@pytest.fixture
def no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def test_http_image_urls_are_fetched(server, ref, demo, image_site, no_proxy):
    e = demo[5]
    status, out, _ = post(server, chat(f"{image_site}/{e['path'].name}", "caption en"))
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == ref.generate(e["image"], "caption en").text
    status, out, _ = post(server, chat(f"{image_site}/missing.png", "caption en"))
    assert status == 400 and out["error"]["param"] == "messages"
    message = out["error"]["message"]
    assert message == f"cannot fetch the image at {image_site}/missing.png: HTTP 404"  # not the remote's own words


def test_a_url_that_does_not_answer_http_is_a_400(server, no_proxy):
    class Garbage(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.recv(65536)
            self.request.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    site = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Garbage)
    with serving(site):
        status, out, _ = post(server, chat(f"http://127.0.0.1:{site.server_address[1]}/a.png", "caption en"))
    assert status == 400 and "cannot fetch the image" in out["error"]["message"], out


def test_a_server_that_does_not_fetch(server, image_site, no_proxy):
    with serving(new_server(server.engine, fetch_images=False)) as closed:
        status, out, _ = post(closed, chat(f"{image_site}/easyvqa_test_0.png", "caption en"))
    assert status == 400 and "does not fetch image URLs" in out["error"]["message"]


def test_models_and_health(server):
    status, out, _ = call(server.url + "/v1/models")
    assert status == 200 and out["object"] == "list"
    [model] = out["data"]
    assert model == {"id": MODEL, "object": "model", "created": server.started, "owned_by": "palitorch"}
    assert call(server.url + f"/v1/models/{MODEL}")[1] == model
    assert call(server.url + "/v1/models/")[1] == out  # a trailing slash is the same path
    status, out, _ = call(server.url + "/v1/models/gpt-4o")
    assert status == 404 and out["error"]["type"] == "invalid_request_error"  # as OpenAI types a 404
    assert out["error"]["code"] == "model_not_found" and "'gpt-4o' is not served here" in out["error"]["message"]
    status, health, _ = call(server.url + "/health?verbose=1")
    assert status == 200 and health["status"] == "ok" and health["model"] == MODEL and health["queued"] == 0
    assert set(health) >= {"requests", "batches", "largest_batch", "tokens"}


def test_concurrent_different_images_each_get_their_own_answer(server, ref, demo):
    """Whatever the batching, every request gets the answer to its own image and prompt."""
    results = {}

    def ask(i, e):
        results[i] = post(server, chat(e["path"], "caption en"))

    threads = [threading.Thread(target=ask, args=(i, e)) for i, e in enumerate(demo)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate(demo):
        status, out, _ = results[i]
        assert status == 200 and out["choices"][0]["message"]["content"] == ref.generate(e["image"], "caption en").text


def test_images_of_other_sizes_and_modes(server, ref):
    image = Image.new("RGBA", (90, 30), (10, 200, 30, 128))
    status, out, _ = post(server, chat(image, "caption en"))
    assert status == 200 and out["choices"][0]["message"]["content"] == ref.generate(image, "caption en").text
