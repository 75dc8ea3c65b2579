"""HTTP plumbing of a live server: status codes and OpenAI error objects, API keys, body limits, keep-alive
connections (also after an error) and shutting down."""

import http.client
import json
import threading
import urllib.parse

import pytest
from serverkit import (
    COMPLETIONS,
    MODEL,
    TIMEOUT,
    HeldPipe,
    RecordingEngine,
    call,
    chat,
    demo_examples,
    live_server,
    new_server,
    post,
    serving,
)

import palitorch
from palitorch.server import ApiError, Engine, Server, parse_chat


@pytest.fixture(scope="module")
def ref():
    return palitorch.load()


@pytest.fixture(scope="module")
def demo():
    return demo_examples()


@pytest.fixture(scope="module")
def server():
    with live_server() as srv:
        yield srv


def connect(server) -> http.client.HTTPConnection:
    host, port = server.server_address[:2]
    return http.client.HTTPConnection(host, port, timeout=TIMEOUT)


def reply(conn) -> tuple[int, dict, http.client.HTTPResponse]:
    r = conn.getresponse()
    return r.status, json.loads(r.read()), r


def error_of(out, status_type="invalid_request_error") -> str:
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}, out
    assert out["error"]["type"] == status_type
    return out["error"]["message"]


def test_unknown_paths_and_methods(server):
    status, out, _ = call(server.url + "/v2/everything")
    assert status == 404 and "no such endpoint: GET /v2/everything" in error_of(out)
    status, out, _ = call(server.url + "/v1/completions", {"prompt": "hi"})
    assert status == 404 and "chat completions only" in error_of(out)
    status, out, _ = call(server.url + COMPLETIONS)
    assert status == 405 and "use POST" in error_of(out)


def test_malformed_requests_are_400(server, demo):
    for raw in (b"{nope", b'"a string"'):
        status, out, _ = post(server, raw)
        assert status == 400 and "the request body" in error_of(out)
    status, out, _ = post(server, chat(demo[0]["path"], "caption en", temperature=-1))
    assert status == 400 and "temperature must be" in error_of(out)
    status, out, _ = post(server, chat(demo[0]["path"], "caption en", model="gpt-4o"))
    assert status == 404 and out["error"]["code"] == "model_not_found"


def test_one_connection_serves_several_requests_even_after_an_error(server, demo):
    conn = connect(server)
    conn.request("GET", "/health")
    assert reply(conn)[0] == 200
    sock = conn.sock
    conn.request("POST", COMPLETIONS, body=b"{nope", headers={"Content-Type": "application/json"})
    status, _, r = reply(conn)
    assert status == 400 and r.getheader("Connection") is None
    conn.request("POST", COMPLETIONS, body=json.dumps(chat(demo[0]["path"], "caption en")))
    status, out, _ = reply(conn)
    assert status == 200 and out["choices"][0]["message"]["content"]
    conn.request("GET", "/nowhere")
    assert reply(conn)[0] == 404
    conn.request("GET", "/v1/models")
    assert reply(conn)[0] == 200
    assert conn.sock is sock  # all on the first connection
    conn.close()


def test_a_body_over_the_limit_is_413_and_ends_the_connection(server, demo):
    with serving(new_server(server.engine, max_body=100)) as small:
        conn = connect(small)
        conn.putrequest("POST", COMPLETIONS)
        conn.putheader("Content-Length", "1000000000")  # declared, never sent: the server must not read it
        conn.endheaders()
        status, out, r = reply(conn)
        assert status == 413 and "1,000,000,000 bytes" in error_of(out) and "limit of 100" in error_of(out)
        assert r.getheader("Connection") == "close"  # so the client opens a new connection for its next request
        conn.request("GET", "/health")
        assert reply(conn)[0] == 200
        conn.close()
        status, out, _ = post(small, {"messages": []})  # 16 bytes: under the limit, read and answered
        assert status == 400 and "messages must be" in error_of(out)


@pytest.mark.parametrize("header, message", [(None, "needs a Content-Length header"),
                                             (("Content-Length", "-1"), "needs a Content-Length header"),
                                             (("Content-Length", "ten"), "needs a Content-Length header")])
def test_a_body_without_a_length_is_411(server, header, message):
    conn = connect(server)
    conn.putrequest("POST", COMPLETIONS)
    if header:
        conn.putheader(*header)
    conn.endheaders()  # no body follows
    status, out, r = reply(conn)
    assert status == 411 and message in error_of(out) and r.getheader("Connection") == "close"
    conn.request("GET", "/health")  # the same client object goes on, on a new connection
    assert reply(conn)[0] == 200
    conn.close()


def chunked(conn, parts: list[bytes], tail: bytes = b"0\r\n\r\n"):
    conn.putrequest("POST", COMPLETIONS)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for part in parts:
        conn.send(b"%x;ext=1\r\n" % len(part) + part + b"\r\n")
    conn.send(tail)
    return reply(conn)


def test_a_chunked_body_is_read_as_one(server, demo):
    """Clients that stream their request body (Transfer-Encoding: chunked, which HTTP/1.1 servers must take) get the
    answer a Content-Length body gets; a malformed or oversized one is a one-line error, and the connection ends."""
    body = json.dumps(chat(demo[0]["path"], "caption en")).encode()
    expected = post(server, json.loads(body))[1]["choices"][0]["message"]["content"]
    conn = connect(server)
    third = len(body) // 3
    status, out, r = chunked(conn, [body[:third], body[third:2 * third], body[2 * third:]],
                             b"0\r\nX-Trailer: 1\r\n\r\n")
    assert status == 200 and out["choices"][0]["message"]["content"] == expected
    assert r.getheader("Connection") == "close"
    conn.close()
    for size in (b"zz", b"-1", b"+10", b"0x10"):  # (int(b"-1", 16) is -1: read to the end, past the limit)
        status, out, _ = chunked(connect(server), [], size + b"\r\n")
        assert status == 400 and "chunk size" in error_of(out), size
    with serving(new_server(server.engine, max_body=len(body) - 1)) as small:
        status, out, _ = chunked(connect(small), [body[:third], body[third:]])
        assert status == 413 and f"limit of {len(body) - 1:,}" in error_of(out)


def test_an_api_key_guards_the_api_but_not_health(server, demo):
    body = chat(demo[0]["path"], "caption en")
    with serving(new_server(server.engine, api_key="s3cret")) as guarded:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, out, _ = post(guarded, body, headers=headers)
            assert status == 401 and out["error"]["code"] == "invalid_api_key"
            assert "Authorization: Bearer KEY" in error_of(out, "authentication_error")
        assert call(guarded.url + "/v1/models")[0] == 401
        assert call(guarded.url + f"/v1/models/{MODEL}")[0] == 401
        status, out, _ = post(guarded, body, headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and out["choices"][0]["message"]["content"]
        assert call(guarded.url + "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(guarded.url + "/v1/models", headers={"Authorization": "bearer  s3cret"})[0] == 200
        assert call(guarded.url + "/v1/models", headers={"Authorization": "Basic s3cret"})[0] == 401
        status, out, _ = call(guarded.url + "/health")
        assert status == 200 and out["status"] == "ok"


def preflight(server, origin: str | None, path: str = COMPLETIONS) -> http.client.HTTPResponse:
    conn = connect(server)
    headers = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    conn.request("OPTIONS", path, headers=headers | ({"Origin": origin} if origin else {}))
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_options_names_the_methods_of_its_path(server):
    """OPTIONS answered "GET, POST, OPTIONS" for every path, though GET /v1/chat/completions is a 405."""
    assert preflight(server, None).getheader("Allow") == "POST, OPTIONS"
    assert preflight(server, None, "/health").getheader("Allow") == "GET, HEAD, OPTIONS"
    assert preflight(server, None, "/v1/models").getheader("Allow") == "GET, OPTIONS"
    assert preflight(server, None, "/nowhere").getheader("Allow") == "GET, POST, OPTIONS"


def test_cors_only_for_the_allowed_origins(server, demo):
    """Browsers read a cross-origin answer only if the server names the page's origin: preflights (no API key)
    and every response, streams and errors included, carry it for allowed origins, and nothing for others."""
    body = chat(demo[0]["path"], "caption en")
    app, other = "http://localhost:3000", "https://evil.example"
    with serving(new_server(server.engine, api_key="k", allow_origins=[app])) as srv:
        allowed = preflight(srv, app)
        assert allowed.status == 204 and allowed.getheader("Access-Control-Allow-Origin") == app
        assert "POST" in allowed.getheader("Access-Control-Allow-Methods")
        assert allowed.getheader("Access-Control-Allow-Headers") == "authorization,content-type"
        assert allowed.getheader("Vary") == "Origin"
        for refused in (preflight(srv, other), preflight(srv, None)):
            assert refused.status == 204 and refused.getheader("Access-Control-Allow-Origin") is None
            assert refused.getheader("Access-Control-Allow-Methods") is None
        key = {"Authorization": "Bearer k"}
        status, out, headers = post(srv, body, headers=key | {"Origin": app})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == app, out
        status, _, headers = post(srv, body, headers={"Origin": app})  # no key: the error is readable too
        assert status == 401 and headers["Access-Control-Allow-Origin"] == app
        status, _, headers = post(srv, body, headers=key | {"Origin": other})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
        conn = connect(srv)
        conn.request("POST", COMPLETIONS, json.dumps(body | {"stream": True}),
                     {"Content-Type": "application/json", "Origin": app} | key)
        response = conn.getresponse()
        assert response.getheader("Access-Control-Allow-Origin") == app and response.read().endswith(b"[DONE]\n\n")
        conn.close()
    with serving(new_server(server.engine, allow_origins=["*"])) as any_origin:
        assert preflight(any_origin, other).getheader("Access-Control-Allow-Origin") == "*"
        status, _, headers = call(any_origin.url + "/health", headers={"Origin": other})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in headers
    status, _, headers = post(server, body, headers={"Origin": app})  # a server that allows none sends none
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_a_model_name_with_spaces_slashes_and_accents(server, demo):
    name = "acme/pali gemma ü"
    srv = Server(("127.0.0.1", 0), name, quiet=True)
    srv.engine = server.engine
    with serving(srv):
        for path in (urllib.parse.quote(name), urllib.parse.quote(name, safe="")):  # "/" as is, or as %2F
            status, out, _ = call(srv.url + "/v1/models/" + path)
            assert status == 200 and out["id"] == name, out
        status, out, _ = post(srv, chat(demo[0]["path"], "caption en", model=name))
        assert status == 200 and out["model"] == name


def test_after_the_engine_stops_requests_get_503_and_health_still_answers(ref, demo):
    engine = Engine(palitorch.load()).start()
    with serving(new_server(engine)) as srv:
        assert post(srv, chat(demo[0]["path"], "caption en"))[0] == 200
        engine.stop()  # joins the engine's thread: its counts are final
        status, out, _ = post(srv, chat(demo[0]["path"], "caption en"))
        assert status == 503 and "shutting down" in error_of(out, "server_error")
        status, health, _ = call(srv.url + "/health")
    tokens = len(ref.generate(demo[0]["image"], "caption en").token_ids)
    assert status == 200 and health == {"status": "ok", "model": MODEL, "queued": 0, "requests": 1, "batches": 1,
                                        "largest_batch": 1, "tokens": tokens}


def test_health_is_current_once_a_client_has_its_answer(ref, demo):
    engine = Engine(palitorch.load()).start()
    with serving(new_server(engine)) as srv:
        for i in range(3):
            assert post(srv, chat(demo[i]["path"], "caption en"))[0] == 200
            _, health, _ = call(srv.url + "/health")  # the engine's thread is still running: no join
            assert health["requests"] == i + 1 and health["batches"] == i + 1, health
    engine.stop()


def test_an_engine_never_started_stops_cleanly(ref, demo):
    engine = Engine(palitorch.load())
    job = engine.submit(parse_chat(chat(demo[0]["path"], "caption en"), MODEL))
    engine.stop()
    with pytest.raises(ApiError) as e:
        job.wait()
    assert e.value.status == 503


def test_a_full_queue_refuses_new_requests_with_503(demo):
    engine = Engine(palitorch.load(), max_queue=2)  # not started: nothing leaves the queue
    waiting = [engine.submit(parse_chat(chat(demo[i]["path"], "caption en"), MODEL)) for i in range(2)]
    with serving(new_server(engine)) as srv:
        status, out, _ = post(srv, chat(demo[2]["path"], "caption en"))
    assert status == 503 and "the server is busy (2 requests waiting)" in error_of(out, "server_error")
    engine.start()
    assert all(len(job.wait()) == 1 for job in waiting)  # the waiting ones are answered
    engine.stop()


def test_stopping_finishes_the_batch_in_progress_and_refuses_the_queue(ref, demo):
    pipe = HeldPipe(palitorch.load())
    engine = RecordingEngine(pipe, start_after=1)
    answers = {}

    def ask(name, prompt):
        answers[name] = post(srv, chat(demo[0]["path"], prompt))

    with serving(new_server(engine)) as srv:
        running = threading.Thread(target=ask, args=("running", "caption en"))
        running.start()
        assert pipe.entered.wait(TIMEOUT)  # the model is answering it
        queued = threading.Thread(target=ask, args=("queued", "answer en " + demo[0]["question"]))
        queued.start()
        engine.wait_for_jobs(2)
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        queued.join(TIMEOUT)  # refused at once, while the model still holds the first request
        assert not queued.is_alive() and running.is_alive()
        pipe.release.set()
        for t in (running, stopper):
            t.join(TIMEOUT)
    assert answers["queued"][0] == 503 and "shutting down" in answers["queued"][1]["error"]["message"]
    status, out, _ = answers["running"]
    assert status == 200 and out["choices"][0]["message"]["content"] == ref.generate(demo[0]["image"],
                                                                                     "caption en").text


def test_closing_the_server_ends_the_connections_kept_alive(server):
    """A kept-alive connection's thread waits for the next request; left running after the server closed, it could
    free the model while the interpreter exits, which aborted the process ("terminate called without an active
    exception", in about half the runs of two server test files). server_close ends such connections and waits."""
    with serving(new_server(server.engine)) as other:
        conn = connect(other)
        conn.request("GET", "/health")
        assert reply(conn)[0] == 200  # the connection stays open, its thread waiting for the next request
        [thread] = other._open.values()
    assert not thread.is_alive() and not other._open
    conn.close()
