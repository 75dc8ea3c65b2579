"""The HTTP side of `palitorch serve`: the standard library's threading HTTP server, speaking OpenAI's API.

    GET  /health                 {"status": "ok", "model": ..., "queued": ..., "requests": ..., ...}
    GET  /metrics                Prometheus metrics: requests, tokens, queue, latency histograms (metrics.py)
    GET  /v1/models              the one model served
    POST /v1/chat/completions    one image + prompt -> answer; "stream": true for server-sent events
    OPTIONS (any path)           a browser's CORS preflight
    other methods                405 with an Allow header (HEAD: the headers only)

Browsers let a web page on another origin read the answers only when the server names that origin
(`allow_origins`, `palitorch serve --allow-origin`): each response to a request from an allowed origin then carries
Access-Control-Allow-Origin, and preflights get the methods and headers the API uses. Without allowed origins no
CORS header is sent, so browsers keep other sites' pages from calling the server (non-browser clients are not
affected either way). A server on a loopback address also answers only requests addressed to this machine by name
(`host_allowed`): a page whose domain is made to resolve to 127.0.0.1 (DNS rebinding) is same-origin with it and
would otherwise be able to use it and read the answers.

One thread per connection parses the request, fetches or decodes its image and waits for the engine's answer; the
model itself runs on the engine's one thread (`engine.py`). Every error is OpenAI's error object with a status
code and a message saying what to change, also the errors the standard library sends itself (a malformed request
line, headers too large). A connection that sends nothing for `CLIENT_TIMEOUT` seconds is closed; waiting for the
engine's answer is not waiting on the connection, so long generations and streams are not cut.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import queue
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from palitorch.server.bodies import read_body
from palitorch.server.engine import Engine
from palitorch.server.fetch import fetch_url
from palitorch.server.hosts import host_allowed, host_name
from palitorch.server.openai import ApiError, ImageCache, parse_body, parse_chat
from palitorch.server.responses import completion
from palitorch.server.sockets import peer_closed, shutdown
from palitorch.server.sse import event, stream

CLOSE_WAIT = 5.0  # seconds server_close waits for the connections' threads to end
HANG_UP_CHECK = 0.25  # seconds between checks that a client waiting for a whole answer is still connected
CLIENT_TIMEOUT = 60.0  # seconds a connection may keep a handler thread waiting for its request (slowloris)
METHODS = "GET, POST, OPTIONS"
# Endpoints of OpenAI's API that PaliGemma cannot answer: a 404 that says what to call instead.
OTHER_APIS = ("/v1/completions", "/v1/embeddings", "/v1/responses")
GONE = object()  # `Handler._first_piece`: the client has left


def allowed_methods(path: str) -> str:
    """The methods a path takes (a 405's Allow header); any other path: those the API uses."""
    if path == "/v1/chat/completions":
        return "POST, OPTIONS"
    if path == "/health":
        return "GET, HEAD, OPTIONS"
    if path in ("/metrics", "/v1/models") or path.startswith("/v1/models/"):
        return "GET, OPTIONS"
    return METHODS


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a client that hangs does not keep the server from stopping
    # The listen backlog (the standard library's is 5): a burst of clients waits to be accepted instead of being
    # reset. The kernel caps it (net.core.somaxconn).
    request_queue_size = 1024
    client_timeout = CLIENT_TIMEOUT

    def __init__(self, address: tuple[str, int], model_id: str, defaults: dict | None = None,
                 api_key: str | None = None, fetch_images: bool = True, max_body: int = 32 << 20,
                 quiet: bool = False, allow_origins: list[str] | None = None, fetch_private: bool = False,
                 allow_hosts: list[str] | None = None):
        """`fetch_private`: may image URLs at loopback and private addresses be fetched (`palitorch serve
        --fetch-private`); off by default, even for a server on 127.0.0.1, which a reverse proxy or tunnel may open
        to anyone. See `fetch.py`. `allow_hosts`: the Host names a server on a loopback address answers besides
        this machine's own (`host_allowed`; a reverse proxy that passes on its public name needs it)."""
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET  # --host ::1 or ::
        self._open: dict[socket.socket, threading.Thread] = {}  # connections being served, and their threads
        self._open_lock = threading.Lock()
        self._closed = False
        super().__init__(address, Handler)
        self.engine: Engine | None = None  # set before serving: the socket is bound before the model loads
        self.model_id, self.defaults, self.api_key = model_id, dict(defaults or {}), api_key and api_key.strip()
        self.fetch_private = fetch_private
        self.fetch = functools.partial(fetch_url, allow_private=fetch_private) if fetch_images else None
        self.images = ImageCache()
        self.max_body, self.quiet = max_body, quiet
        self.allow_origins = set(allow_origins or ())  # "*": any origin
        self.allow_hosts = {host_name(h) for h in allow_hosts or ()}
        self.loopback = ipaddress.ip_address(self.server_address[0].split("%")[0]).is_loopback
        self.started = int(time.time())

    def track(self, connection: socket.socket, serving: bool) -> None:
        """A handler thread begins (`serving`) or ends serving a connection (one accepted as the server closed is
        ended at once)."""
        with self._open_lock:
            if serving and self._closed:
                shutdown(connection)
            elif serving:
                self._open[connection] = threading.current_thread()
            else:
                self._open.pop(connection, None)

    def server_close(self) -> None:
        """Stop listening, end the connections still open (kept alive by clients between requests) and wait a little
        for their threads: else they outlive the server, and one that ends while the interpreter exits frees the
        model's tensors then, which aborts the process (torch takes the GIL in a tensor's destructor). Call it after
        `engine.stop()`, so that requests in progress get their answers first (and `stop_listening` before it)."""
        self.stop_listening()
        with self._open_lock:
            self._closed, left = True, list(self._open.items())
        for connection, _ in left:  # a thread waiting for its next request reads the end; replies still go out
            shutdown(connection, socket.SHUT_RD)
        deadline = time.monotonic() + CLOSE_WAIT
        for connection, thread in left:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                shutdown(connection)

    def stop_listening(self) -> None:
        """Close the listening socket: new clients are refused at once (not left waiting while the model drains)."""
        super().server_close()

    def cors_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for a request from `origin` (None: send no CORS headers)."""
        if not origin or not self.allow_origins:
            return None
        if "*" in self.allow_origins:
            return "*"
        return origin if origin in self.allow_origins else None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive; every response says its length (or closes, for a stream)
    server_version = "palitorch"
    _streaming = False  # a stream's status line has gone out (the connection closes after it)

    # ------------------------------------------------------------------ routes

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def do_OPTIONS(self) -> None:
        self._guard(self._options)

    def do_PUT(self) -> None:
        self._guard(self._not_allowed)

    do_DELETE = do_PATCH = do_PUT

    def do_HEAD(self) -> None:
        """An uptime monitor's `HEAD /health`: GET's status and headers, no body (`_json` writes none for HEAD)."""
        path = self.path.split("?", 1)[0].rstrip("/")
        self._guard(self._get if path == "/health" else self._not_allowed)

    def _not_allowed(self) -> None:
        self._skip_body()
        allow = allowed_methods(self.path.split("?", 1)[0].rstrip("/"))
        raise ApiError(405, f"{self.command} is not used by this API: use {allow}", headers={"Allow": allow})

    def _options(self) -> None:
        """A CORS preflight (no body, no API key: browsers send neither): which methods and headers may follow."""
        self._skip_body()
        allow = allowed_methods(self.path.split("?", 1)[0].rstrip("/"))  # (as a 405 names them)
        self.send_response(204)
        if self.close_connection:  # a body it could not skip
            self.send_header("Connection", "close")
        self.send_header("Allow", allow)
        if self.server.cors_origin(self.headers.get("Origin")):
            self.send_header("Access-Control-Allow-Methods", allow)
            self.send_header("Access-Control-Allow-Headers",
                             self.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_response(self, code: int, message: str | None = None) -> None:
        if self.server.engine is not None:  # (none in a server's first moments, while the model loads)
            self.server.engine.metrics.response(code)
        super().send_response(code, message)

    def end_headers(self) -> None:
        """Every response (JSON, stream, preflight) to a request from an allowed origin says so."""
        headers = getattr(self, "headers", None)  # none yet when the request line itself was malformed
        allowed = self.server.cors_origin(headers.get("Origin") if headers else None)
        if allowed:
            self.send_header("Access-Control-Allow-Origin", allowed)
            if allowed != "*":
                self.send_header("Vary", "Origin")  # the answer depends on the Origin: caches must key on it
        self.send_header("X-Request-Id", getattr(self, "request_id", None) or f"req_{uuid.uuid4().hex}")
        self.request_id = None  # (a keep-alive connection's next error from the standard library gets its own)
        super().end_headers()

    def _get(self) -> None:
        self._skip_body()
        path = urllib.parse.unquote(self.path.split("?", 1)[0]).rstrip("/") or "/"  # /v1/models/my%20model: "my model"
        if path == "/metrics":  # Prometheus (metrics.py); like /health, no API key
            engine = self.server.engine
            text = engine.metrics.render(engine.queued + engine.held, engine.running, engine.pipe.feature_cache)
            self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/health":
            engine = self.server.engine
            self._json(200, {"status": "ok", "model": self.server.model_id, "queued": engine.queued,
                             **engine.stats})
        elif path == "/v1/models":
            self._authorize()
            self._json(200, {"object": "list", "data": [self._model()]})
        elif path == f"/v1/models/{self.server.model_id}":
            self._authorize()
            self._json(200, self._model())
        elif path.startswith("/v1/models/"):
            self._authorize()
            raise ApiError(404, f"model {path[len('/v1/models/'):]!r} is not served here; this server serves "
                           f"{self.server.model_id!r}", "model", "model_not_found")
        elif path == "/v1/chat/completions":
            raise ApiError(405, "use POST for /v1/chat/completions", headers={"Allow": allowed_methods(path)})
        else:
            raise self._no_endpoint(path)

    def _post(self) -> None:
        body = self._body()  # read first: a connection kept alive must not start its next request mid-body
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path in ("/health", "/metrics", "/v1/models") or path.startswith("/v1/models/"):
            raise ApiError(405, f"use GET for {path}", headers={"Allow": allowed_methods(path)})
        if path != "/v1/chat/completions":
            raise self._no_endpoint(path)
        self._authorize()
        req = parse_chat(parse_body(body), self.server.model_id, self.server.defaults, self.server.fetch,
                         self.server.images)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        job = self.server.engine.submit(req)
        if req.stream:
            first = self._first_piece(job)
            if first is not GONE:
                stream(self, job, rid, created, first)
            return
        results = self._wait(job)
        if results is None:  # the client has gone: no one to answer
            return
        tokenizer = self.server.engine.pipe.processor.tokenizer
        self._json(200, completion(rid, created, self.server.model_id, req, results, tokenizer))

    def _wait(self, job):
        """A job's results, or None if its client hangs up first (a timeout and retry in an SDK): the job is then
        cancelled, and the engine frees its rows at the next step, as for a stream whose client has left."""
        while not job.done.wait(HANG_UP_CHECK):
            if self._abandoned(job):
                return None
        return job.wait()

    def _first_piece(self, job):
        """A stream's first item (`Job.pieces`), or GONE if its client hangs up first (an SDK's timeout while it is
        queued): the job is then cancelled, as in `_wait`, and dropped rather than decoded for no one."""
        while True:
            try:
                return job.pieces.get(timeout=HANG_UP_CHECK)
            except queue.Empty:
                if self._abandoned(job):
                    return GONE

    def _abandoned(self, job) -> bool:
        """Whether the client has hung up (`peer_closed`); if so its job is cancelled and the connection closed."""
        if not peer_closed(self.connection):
            return False
        job.cancelled.set()
        self.close_connection = True
        return True

    def _no_endpoint(self, path: str) -> ApiError:
        if path in OTHER_APIS:  # PaliGemma answers about an image: only chat messages can carry one
            return ApiError(404, f"this server answers chat completions only, not {path}: POST /v1/chat/completions "
                            "with an image_url part and a text part (PaliGemma needs an image)")
        return ApiError(404, f"no such endpoint: {self.command} {path}; try POST /v1/chat/completions or "
                        "GET /v1/models")

    def _model(self) -> dict:
        return {"id": self.server.model_id, "object": "model", "created": self.server.started,
                "owned_by": "palitorch"}

    # ------------------------------------------------------------------ plumbing

    def _guard(self, route) -> None:
        self.request_id = f"req_{uuid.uuid4().hex}"  # each response names its request (X-Request-Id)
        try:
            host = self.headers.get("Host")
            if self.server.loopback and not host_allowed(host, self.server.allow_hosts):
                self.close_connection = True  # (its body, if any, is left unread)
                raise ApiError(403, f"the Host header {host!r} does not name this machine: a server on a loopback "
                               "address answers requests for localhost or an IP address only (against DNS "
                               "rebinding); if a proxy passes that name on, start the server with --allow-host "
                               f"{host_name(host)}")
            route()
        except ApiError as e:
            self._json(e.status, e.body(), e.headers)
        except OSError:  # the client hung up mid-reply: nothing to tell it
            self.close_connection = True
        except Exception as e:  # a bug: the client gets a 500, the server a traceback, and serving goes on
            import traceback

            traceback.print_exc(file=sys.stderr)
            error = ApiError(500, f"internal error: {type(e).__name__}: {e}").body()
            if not self._streaming:
                self._json(500, error)
                return
            try:  # a stream has begun: its status line is out, so the error is its last event
                event(self, error)
            except OSError:
                pass

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        # (header values arrive as latin-1 text: back to the bytes the client sent, which hold a UTF-8 key)
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                                                 key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _body(self) -> bytes:
        """The request's body (Content-Length or chunked), within the server's limit; else ApiError (bodies.py)."""
        return read_body(self, self.server.max_body)

    def _skip_body(self) -> None:
        """Read and drop the body of a request that takes none (GET, OPTIONS, ...), so that a kept-alive connection's
        next request starts where it should; a body that cannot be read so ends the connection instead."""
        if "Content-Length" not in self.headers and "Transfer-Encoding" not in self.headers:
            return
        try:
            self._body()
        except ApiError:
            self.close_connection = True

    def setup(self) -> None:
        self.timeout = self.server.client_timeout  # reads and writes on the connection time out (StreamRequestHandler)
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The errors the standard library answers itself (a malformed request line, headers too large, a method
        with no do_ here) as OpenAI's error object, not an HTML page. The connection closes after it."""
        self.close_connection = True
        reason = self.responses.get(code, ("error",))[0]
        advice = {431: ": send fewer or shorter headers", 414: ": send a shorter URL",
                  501: f": this server answers {METHODS}"}.get(code, "")
        self._json(code, ApiError(code, f"{message or reason}{advice}").body(),
                   {"Allow": METHODS} if code == 501 else None)

    def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            if self.close_connection:  # e.g. after a refused body: tell a keep-alive client not to reuse the connection
                self.send_header("Connection", "close")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD request gets the headers only
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {format % args}\n")
