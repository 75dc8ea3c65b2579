"""The HTTP side of `palitorch serve`: the standard library's threading HTTP server, speaking OpenAI's API.

    GET  /health                 {"status": "ok", "model": ..., "queued": ..., "requests": ..., ...}
    GET  /v1/models              the one model served
    POST /v1/chat/completions    one image + prompt -> answer; "stream": true for server-sent events
    OPTIONS (any path)           a browser's CORS preflight

Browsers let a web page on another origin read the answers only when the server names that origin
(`allow_origins`, `palitorch serve --allow-origin`): each response to a request from an allowed origin then carries
Access-Control-Allow-Origin, and preflights get the methods and headers the API uses. Without allowed origins no
CORS header is sent, so browsers keep other sites' pages from calling the server (non-browser clients are not
affected either way).

One thread per connection parses the request, fetches or decodes its image and waits for the engine's answer; the
model itself runs on the engine's one thread (`engine.py`). Every error is OpenAI's error object with a status
code and a message saying what to change.
"""

from __future__ import annotations

import hmac
import http.client
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from palitorch.server.engine import Engine
from palitorch.server.openai import (
    ApiError,
    ImageCache,
    bad,
    chunk,
    completion,
    finish_reason,
    parse_body,
    parse_chat,
    token_entry,
    usage,
)

MAX_IMAGE_BYTES = 20 << 20


def fetch_url(url: str, timeout: float = 15.0, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes at an http(s) URL, at most `limit` of them; ApiError 400 on any failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "palitorch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only, checked)
            data = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # e.g. not HTTP at all
        reason = getattr(e, "reason", None) or e
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        raise bad(f"cannot fetch the image at {url[:80]}: {reason}", "messages") from None
    if len(data) > limit:
        raise bad(f"the image at {url[:80]} is over {limit >> 20} MiB", "messages")
    return data


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a client that hangs does not keep the server from stopping

    def __init__(self, address: tuple[str, int], model_id: str, defaults: dict | None = None,
                 api_key: str | None = None, fetch_images: bool = True, max_body: int = 32 << 20,
                 quiet: bool = False, allow_origins: list[str] | None = None):
        super().__init__(address, Handler)
        self.engine: Engine | None = None  # set before serving: the socket is bound before the model loads
        self.model_id, self.defaults, self.api_key = model_id, dict(defaults or {}), api_key
        self.fetch = fetch_url if fetch_images else None
        self.images = ImageCache()
        self.max_body, self.quiet = max_body, quiet
        self.allow_origins = set(allow_origins or ())  # "*": any origin
        self.started = int(time.time())

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
        return f"http://{host}:{port}"


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
        """A CORS preflight (no body, no API key: browsers send neither): which methods and headers may follow."""
        self.send_response(204)
        self.send_header("Allow", "GET, POST, OPTIONS")
        if self.server.cors_origin(self.headers.get("Origin")):
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers",
                             self.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def end_headers(self) -> None:
        """Every response (JSON, stream, preflight) to a request from an allowed origin says so."""
        headers = getattr(self, "headers", None)  # none yet when the request line itself was malformed
        allowed = self.server.cors_origin(headers.get("Origin") if headers else None)
        if allowed:
            self.send_header("Access-Control-Allow-Origin", allowed)
            if allowed != "*":
                self.send_header("Vary", "Origin")  # the answer depends on the Origin: caches must key on it
        super().end_headers()

    def _get(self) -> None:
        path = urllib.parse.unquote(self.path.split("?", 1)[0]).rstrip("/")  # /v1/models/my%20model: "my model"
        if path == "/health":
            engine = self.server.engine
            self._json(200, {"status": "ok", "model": self.server.model_id, "queued": engine.queued,
                             **engine.stats})
        elif path == "/v1/models":
            self._authorize()
            self._json(200, {"object": "list", "data": [self._model()]})
        elif path == f"/v1/models/{self.server.model_id}":
            self._authorize()
            self._json(200, self._model())
        elif path == "/v1/chat/completions":
            raise ApiError(405, "use POST for /v1/chat/completions")
        else:
            raise ApiError(404, f"no such endpoint: GET {path}; try POST /v1/chat/completions or GET /v1/models")

    def _post(self) -> None:
        body = self._body()  # read first: a connection kept alive must not start its next request mid-body
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            raise ApiError(404, f"no such endpoint: POST {path}; this server answers POST /v1/chat/completions")
        self._authorize()
        req = parse_chat(parse_body(body), self.server.model_id, self.server.defaults, self.server.fetch,
                         self.server.images)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        job = self.server.engine.submit(req)
        if req.stream:
            return self._stream(job, rid, created)
        results = job.wait()
        tokenizer = self.server.engine.pipe.processor.tokenizer
        self._json(200, completion(rid, created, self.server.model_id, req, results, tokenizer))

    def _model(self) -> dict:
        return {"id": self.server.model_id, "object": "model", "created": self.server.started,
                "owned_by": "palitorch"}

    # ------------------------------------------------------------------ streaming

    def _stream(self, job, rid: str, created: int) -> None:
        """Server-sent events: a role chunk, the text pieces, a finish chunk, (usage), [DONE]. The status line waits
        for the first piece, so a refused input is still an ordinary error response. With logprobs, each piece's
        chunk carries its tokens' entries (`Piece.tokens`), and the finish chunk those of tokens that brought no
        text of their own after the last piece."""
        first = job.pieces.get()
        if first is None and job.error is not None:
            raise job.error
        model = self.server.model_id
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end: no length needed
        self.end_headers()
        self.close_connection = True
        self._streaming = True  # from here an error goes into the stream, not into a second status line
        tokenizer = self.server.engine.pipe.processor.tokenizer
        want, sent = job.request.logprobs, 0  # token entries sent so far

        def entries(tokens) -> list[dict] | None:
            return [token_entry(tokenizer, t, lp, alt) for t, lp, alt in tokens] if want else None

        try:
            self._event(chunk(rid, created, model, {"role": "assistant", "content": ""}))
            piece = first
            while piece is not None:
                tokens = getattr(piece, "tokens", ())
                self._event(chunk(rid, created, model, {"content": piece}, logprobs=entries(tokens)))
                sent += len(tokens)
                piece = job.pieces.get()
            # None came: the job's results or error are set (before it, as the engine finishes a job)
            if job.error is not None:  # failed after the status line went out: say so in the stream
                self._event(job.error.body())
            elif job.results:  # (none when the job was cancelled: the stream just ends)
                result = job.results[0]
                alternatives = result.top_logprobs or [None] * len(result.token_ids)
                rest = list(zip(result.token_ids, result.logprobs, alternatives))[sent:]
                self._event(chunk(rid, created, model, {}, finish_reason(result), logprobs=entries(rest) if rest
                                  else None))
                if job.request.include_usage:
                    self._event(chunk(rid, created, model, {}, usage_=usage(job.results), choices=False))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client went away: stop generating for it
            job.cancelled.set()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    # ------------------------------------------------------------------ plumbing

    def _guard(self, route) -> None:
        try:
            route()
        except ApiError as e:
            self._json(e.status, e.body())
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
                self._event(error)
            except OSError:
                pass

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the request body with a Content-Length header, not chunked")
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:  # rfile.read(-1) would wait for the client to close the connection
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(411, "the request needs a Content-Length header giving the body's size in bytes") from None
        if length > self.server.max_body:
            self.close_connection = True  # the unread body cannot be skipped: end the connection
            raise ApiError(413, f"the request body is {length:,} bytes, over the server's limit of "
                           f"{self.server.max_body:,}: send a smaller image")
        return self.rfile.read(length)

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            if self.close_connection:  # e.g. after a refused body: tell a keep-alive client not to reuse the connection
                self.send_header("Connection", "close")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {format % args}\n")
