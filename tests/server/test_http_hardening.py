"""What a live server answers to clients that misbehave or ask for what is not there: a backlog for bursts of
clients, bodies on GET and OPTIONS, other methods (405 with Allow), the standard library's own errors as JSON,
clients that stop sending, Retry-After on 503, 404s that say what to call, and image URLs at private addresses."""

import http.client
import json
import socket
import threading
import time

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
    new_server,
    post,
    serving,
    stream_events,
)

import palitorch
from palitorch.server import Engine, Server, parse_chat
from palitorch.server.metrics import Metrics

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server():
    """A server without an engine: nothing here reaches the model."""
    with serving(new_server(None)) as srv:
        yield srv


def connect(server) -> http.client.HTTPConnection:
    host, port = server.server_address[:2]
    return http.client.HTTPConnection(host, port, timeout=TIMEOUT)


def raw_exchange(server, data: bytes, timeout: float = TIMEOUT) -> tuple[str, dict, bytes]:
    """Send `data` on a new socket, read until the server closes it -> (status line, headers, body)."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_the_listen_backlog_takes_a_burst_of_clients():
    assert Server.request_queue_size >= 128  # the standard library's 5 resets clients past the fifth under a burst


def test_a_body_nested_too_deeply_is_a_400(server):
    status, out, _ = post(server, b"[" * 100000 + b"]" * 100000)
    assert status == 400 and "not valid JSON" in out["error"]["message"]


@pytest.mark.parametrize("method", ["OPTIONS", "GET"])
def test_a_body_on_a_request_that_takes_none_is_read_and_dropped(server, method):
    conn = connect(server)
    conn.request(method, "/v1/models", body=b"HELLO")  # Content-Length: 5
    first = conn.getresponse()
    first.read()
    assert first.status in (200, 204) and first.getheader("Connection") is None
    conn.request("GET", "/v1/models")  # the next request on the same connection starts where it should
    second = conn.getresponse()
    assert second.status == 200 and json.loads(second.read())["object"] == "list"
    conn.close()


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_with_allow(server, method):
    status, out, headers = call(server.url + COMPLETIONS, b"{}", method=method)
    assert status == 405 and headers["Allow"] == "POST, OPTIONS" and set(out["error"]) == ERROR_KEYS  # its own
    assert call(server.url + "/nowhere", b"{}", method=method)[2]["Allow"] == "GET, POST, OPTIONS"
    assert call(server.url + "/health", b"{}", method=method)[2]["Allow"] == "GET, HEAD, OPTIONS"  # (monitors)
    assert out["error"]["type"] == "invalid_request_error" and f"{method} is not used" in out["error"]["message"]


def test_head_is_405_with_the_headers_only_but_for_health(server):
    import types

    engine = types.SimpleNamespace(queued=0, stats={}, metrics=Metrics())  # what /health reads of an engine
    with serving(new_server(engine)) as monitored:
        conn = connect(monitored)
        conn.request("HEAD", "/health")  # an uptime monitor's check: GET's status and headers
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "application/json" and r.read() == b""
        conn.close()
    conn = connect(server)
    conn.request("HEAD", "/v1/models")
    r = conn.getresponse()
    assert r.status == 405 and r.getheader("Allow") == "GET, OPTIONS" and r.read() == b""
    conn.request("GET", "/v1/models")  # no body was sent after the headers: the connection is still in step
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["object"] == "list"
    conn.close()


def test_get_on_chat_completions_says_which_methods(server):
    status, out, headers = call(server.url + COMPLETIONS)
    assert status == 405 and headers["Allow"] == "POST, OPTIONS" and "use POST" in out["error"]["message"]
    status, out, headers = call(server.url + "/v1/models", {"x": 1})
    assert status == 405 and headers["Allow"] == "GET, OPTIONS"


@pytest.mark.parametrize("request_bytes, status, words", [
    (b"GET /a b HTTP/1.1\r\n\r\n", 400, "Bad request syntax"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431, "fewer or shorter"),
    (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431, "fewer or shorter"),
    (b"FROB / HTTP/1.1\r\n\r\n", 501, "this server answers GET, POST, OPTIONS"),
])
def test_the_standard_library_s_own_errors_are_json(server, request_bytes, status, words):
    line, headers, body = raw_exchange(server, request_bytes)
    assert line.startswith(f"HTTP/1.1 {status} ") and headers["Content-Type"] == "application/json", line
    out = json.loads(body)
    assert set(out["error"]) == ERROR_KEYS and words in out["error"]["message"], out


def test_a_client_that_stops_sending_is_cut_off():
    with serving(new_server(None)) as srv:
        srv.client_timeout = 0.5
        start = b"POST " + COMPLETIONS.encode() + b" HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50\r\n\r\nab"
        line, _, body = raw_exchange(srv, start, timeout=10)  # the old server never answered: recv timed out
        assert line.startswith("HTTP/1.1 408 ") and "ended before the 50 bytes" in json.loads(body)["error"]["message"]
        with socket.create_connection(srv.server_address[:2], timeout=10) as idle:  # sends nothing at all
            assert idle.recv(100) == b""  # closed by the server


def test_waiting_for_the_model_is_not_a_client_timeout():
    """The timeout is on the connection's reads and writes: a request the model holds longer, plain or streamed,
    is answered in full."""
    demo = demo_examples()
    pipe = HeldPipe(palitorch.load())
    engine = RecordingEngine(pipe, start_after=2)  # both requests wait together, then the model holds them
    answers = {}
    with serving(new_server(engine)) as srv:
        srv.client_timeout = 0.2
        plain, streamed = chat(demo[0]["path"], "caption en"), chat(demo[1]["path"], "caption en", stream=True)
        threads = [threading.Thread(target=lambda: answers.update(plain=post(srv, plain))),
                   threading.Thread(target=lambda: answers.update(stream=stream_events(srv, streamed)))]
        for t in threads:
            t.start()
        assert pipe.entered.wait(TIMEOUT)
        time.sleep(1.0)  # held five timeouts long
        pipe.release.set()
        for t in threads:
            t.join(TIMEOUT)
    engine.stop()
    assert answers["plain"][0] == 200 and answers["plain"][1]["choices"][0]["message"]["content"]
    assert answers["stream"][1][-1] == "[DONE]"


def test_a_full_queue_says_when_to_retry():
    demo = demo_examples()
    engine = Engine(palitorch.load(), max_queue=1)  # not started: nothing leaves the queue
    engine.submit(parse_chat(chat(demo[0]["path"], "caption en"), MODEL))
    with serving(new_server(engine)) as srv:
        status, out, headers = post(srv, chat(demo[1]["path"], "caption en"))
    assert status == 503 and headers["Retry-After"] == "1" and out["error"]["type"] == "server_error"
    engine.stop()


def test_404s_say_what_is_there(server):
    status, out, _ = call(server.url + "/v1/models/other")
    assert status == 404 and out["error"]["code"] == "model_not_found" and out["error"]["param"] == "model"
    assert out["error"]["type"] == "invalid_request_error"
    assert out["error"]["message"] == f"model 'other' is not served here; this server serves {MODEL!r}"
    status, out, _ = call(server.url + "/")
    assert status == 404 and out["error"]["message"].startswith("no such endpoint: GET /;")
    for path in ("/v1/completions", "/v1/embeddings"):
        status, out, _ = call(server.url + path, {"prompt": "hi", "input": "hi"})
        assert status == 404 and out["error"]["type"] == "invalid_request_error"
        assert out["error"]["message"].startswith(f"this server answers chat completions only, not {path}: POST "
                                                  "/v1/chat/completions with an image_url part")


def test_a_server_fetches_no_private_address_unless_told_to(server):
    """Not even a server on 127.0.0.1 (a reverse proxy or a tunnel may open it to anyone): --fetch-private only."""
    with serving(new_server(None)) as srv:
        for host in ("127.0.0.1", "localhost", "[::1]", "10.0.0.1", "169.254.169.254"):
            status, out, _ = post(srv, chat(f"http://{host}:{server.server_address[1]}/a.png", "caption en"))
            assert status == 400 and out["error"]["param"] == "messages", out
            assert "private address" in out["error"]["message"] or "never fetches" in out["error"]["message"]
    local = Server(("127.0.0.1", 0), MODEL, quiet=True)
    local.server_close()
    assert not local.fetch_private
    public = Server(("0.0.0.0", 0), MODEL, quiet=True)
    public.server_close()
    assert not public.fetch_private
    allowed = Server(("0.0.0.0", 0), MODEL, quiet=True, fetch_private=True)  # palitorch serve --fetch-private
    allowed.server_close()
    assert allowed.fetch_private


def test_serve_fetch_private_is_wired(capsys):
    import argparse

    from run_cli import cli

    from palitorch.cli import serve as serve_cli

    def bind(host, fetch_private, allow_hosts=None):
        args = argparse.Namespace(host=host, port=0, served_model_name="m", model=None, api_key=None, no_fetch=False,
                                  max_body_mb=1, quiet=True, allow_origins=None, fetch_private=fetch_private,
                                  allow_hosts=allow_hosts)
        srv = serve_cli.bind(args, {})
        srv.server_close()
        return srv.fetch_private, srv.allow_hosts

    assert [bind("0.0.0.0", False)[0], bind("0.0.0.0", True)[0], bind("127.0.0.1", False)[0]] == [False, True, False]
    assert bind("127.0.0.1", False, ["a.example", "B.example"])[1] == {"a.example", "b.example"}
    assert "--fetch-private" in cli(["serve", "--help"], capsys)[1]
    assert "--allow-host" in cli(["serve", "--help"], capsys)[1]


def test_an_ipv6_host_binds_and_answers():
    """--host ::1 failed with "Address family for hostname not supported" (the server was IPv4 only)."""
    import socket
    import types

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        srv = Server(("::1", 0), MODEL, quiet=True)
    except OSError as e:  # IPv6 compiled in but not configured (some containers)
        pytest.skip(f"cannot bind ::1 here: {e}")
    srv.engine = types.SimpleNamespace(queued=0, stats={}, metrics=Metrics())
    assert srv.url.startswith("http://[::1]:")
    with serving(srv):
        status, out, _ = call(srv.url + "/health")
    assert status == 200 and out["status"] == "ok"


def test_a_loopback_server_answers_only_host_names_of_this_machine(server):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example. A server
    on a loopback address refuses it (403, and says which option accepts a proxy's name); localhost, IP addresses
    and this machine's name pass. `--allow-host` adds names; a server on another address answers any name."""
    from palitorch.server.hosts import host_allowed

    def models(host):
        conn = connect(server)
        conn.putrequest("GET", "/v1/models", skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        out = json.loads(r.read())
        conn.close()
        return r.status, out

    status, out = models("evil.example:8000")
    assert status == 403 and "--allow-host" in out["error"]["message"] and "'evil.example:8000'" in \
        out["error"]["message"]
    assert "--allow-host evil.example" in out["error"]["message"]  # the name, without the port, to copy
    me = socket.gethostname()
    for good in ("localhost:8000", "LOCALHOST.", "127.0.0.1", "127.1:8000", "[::1]:8000", "app.localhost",
                 "host.docker.internal", me, f"{me}.local:80"):
        assert models(good)[0] == 200, good
    for evil in ("evil.local", "evil.internal", "127.0.0.1.evil.example", "1.2.3.example"):  # mDNS, hotspot DNS
        assert models(evil)[0] == 403, evil
    assert host_allowed("proxy.example.org:443", {"proxy.example.org"})
    assert host_allowed("any.example", {"*"}) and not host_allowed("any.example", set())
    assert host_allowed(None, set()) and host_allowed("10.0.0.7:80", set()) and host_allowed("[fe80::1]", set())
    assert not host_allowed("localhost.evil.example", set())
    allowed = Server(("127.0.0.1", 0), MODEL, quiet=True, allow_hosts=["Proxy.Example.ORG.:443"])
    try:
        assert allowed.loopback and allowed.allow_hosts == {"proxy.example.org"}
    finally:
        allowed.server_close()
    anywhere = Server(("0.0.0.0", 0), MODEL, quiet=True)
    try:
        assert not anywhere.loopback  # no Host check: it is meant to be reached by any name
    finally:
        anywhere.server_close()
