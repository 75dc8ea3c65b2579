"""Helpers for the server tests (no conftest.py here: tests/cli imports its own `conftest` by name): request bodies,
HTTP calls (urllib, no proxy), a server on a background thread, the bodies of the fixtures, and engines/pipelines a
test can hold so that batching and cancellation happen deterministically, not by timing."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

import palitorch
from palitorch.server import Engine, Server

ASSETS = Path(palitorch.__file__).parent / "assets"
MODEL = "tiny-test"
COMPLETIONS = "/v1/chat/completions"
TIMEOUT = 120  # seconds: a safety net only, never a measurement

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local servers: never through a proxy


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(image) -> str:
    """A path or PIL image -> data:image/png;base64,..."""
    raw = Path(image).read_bytes() if isinstance(image, (str, Path)) else png_bytes(image)
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def chat(image, prompt: str, **options) -> dict:
    """A chat-completions body: one user message, an image part (path, PIL image or URL string) and a text part."""
    url = image if isinstance(image, str) else data_url(image)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    return {"messages": [{"role": "user", "content": content}], **options}


def call(url: str, body=None, method: str | None = None, headers: dict | None = None):
    """-> (status, decoded JSON, headers). `body`: a dict (sent as JSON), bytes, or None (GET)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})},
                                     method=method)
    try:
        with _opener.open(request, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read()), e.headers


def post(server: Server, body, **kw):
    return call(server.url + COMPLETIONS, body, **kw)


def stream_events(server: Server, body: dict) -> tuple[str, list]:
    """POST a streaming request -> (content type, [each event's data: parsed JSON, or the string "[DONE]"])."""
    request = urllib.request.Request(server.url + COMPLETIONS, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with _opener.open(request, timeout=TIMEOUT) as r:
        kind, raw = r.headers["Content-Type"], r.read().decode()  # the stream ends with the connection
    assert raw.endswith("\n\n"), raw[-80:]
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return kind, events


@contextmanager
def serving(server: Server):
    """Run `server` on a daemon thread for the block; shut it down after."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


def ask_all(engine: Engine, bodies: list[dict], in_order: bool = False) -> list:
    """Send every body at once, each from its own thread, to a server on `engine`; stop the engine after. Answers in
    the bodies' order: (status, json, headers), or for a stream (content type, events) and, if it was refused
    before it began, (status, json). `in_order` (a RecordingEngine): each request reaches the queue before the next
    is sent, so they queue in the bodies' order."""
    answers = [None] * len(bodies)

    def ask(i):
        if not bodies[i].get("stream"):
            answers[i] = post(srv, bodies[i])
            return
        try:
            answers[i] = stream_events(srv, bodies[i])
        except urllib.error.HTTPError as error:
            with error:
                answers[i] = (error.code, json.loads(error.read()))

    with serving(new_server(engine)) as srv:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
            if in_order:
                engine.wait_for_jobs(1)
        for t in threads:
            t.join(TIMEOUT)
    engine.stop()
    assert all(a is not None for a in answers)
    return answers


def new_server(engine: Engine | None, **kw) -> Server:
    server = Server(("127.0.0.1", 0), MODEL, quiet=True, **kw)
    server.engine = engine
    return server


class RecordingEngine(Engine):
    """An Engine that keeps every job submitted to it (`jobs`, `arrived` released once per job) and, with
    `start_after=k`, starts its thread only when the k-th job has arrived: k concurrent requests then wait together
    in the queue, so how they are batched does not depend on timing."""

    def __init__(self, pipe, start_after: int | None = None, **kw):
        super().__init__(pipe, **kw)
        self.jobs, self.start_after = [], start_after
        self.arrived = threading.Semaphore(0)
        self._lock = threading.Lock()

    def submit(self, request, *args, **kw):
        job = super().submit(request, *args, **kw)
        with self._lock:
            self.jobs.append(job)
            if len(self.jobs) == self.start_after:
                self.start()
        self.arrived.release()
        return job

    def wait_for_jobs(self, k: int) -> None:
        for _ in range(k):
            assert self.arrived.acquire(timeout=TIMEOUT), "a request never reached the engine"


class HeldPipe:
    """A Pipeline whose `generate` and live batches record what they are asked and wait for `release` (after setting
    `entered`): the test decides when the model answers (`released=True`: at once). `calls` holds each generate
    call's batch size, `options` its decoding options; `lives` each live batch's options and the size of each of its
    admissions. A sequence of the prompt "endless" (streamed, or in a live batch) never ends by itself, only when
    its engine no longer wants it (`closed` is set then)."""

    def __init__(self, pipe, released: bool = False):
        self.pipe, self.calls, self.options = pipe, [], []
        self.stream_calls = []  # each stream_batch call's batch size
        self.lives = []  # (options, [rows admitted at each admission]) per live batch
        self.entered, self.release, self.closed = threading.Event(), threading.Event(), threading.Event()
        if released:
            self.release.set()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, image, prompt, **kw):
        self.calls.append(1 if isinstance(prompt, str) else len(prompt))
        self.options.append(kw)
        self.entered.set()
        assert self.release.wait(TIMEOUT)
        return self.pipe.generate(image, prompt, **kw)

    @contextmanager
    def live(self, max_rows: int = 8, **kw):
        admits = []
        self.lives.append((kw, admits))
        with self.pipe.live(max_rows, **kw) as live:
            yield HeldLive(self, live, admits)

    def stream_batch(self, images, prompts, keep_going=None, **kw):
        self.stream_calls.append(len(prompts))
        if list(prompts) != ["endless"]:
            return self.pipe.stream_batch(images, prompts, keep_going=keep_going, **kw)
        held = self

        def endless():  # like Pipeline.stream_batch, it asks keep_going() once per step
            try:
                while keep_going is None or keep_going():
                    yield 0, "more "
                    held.entered.set()
                    time.sleep(0.002)  # a throttle, not a synchronisation: it ends only when no one wants it
            finally:
                held.closed.set()

        return endless()


class HeldLive:
    """A LiveBatch that records the rows of each admission, waits for its HeldPipe's `release` before admitting
    (unless one of the prompts is "endless"), and decodes a sequence of the prompt "endless" as "more " at every
    step until it is released."""

    def __init__(self, held: HeldPipe, live, admits: list):
        self.held, self.live, self.admits, self.endless = held, live, admits, set()

    def __getattr__(self, name):
        return getattr(self.live, name)

    def admit(self, images, prompts, tags=None, streams=None, options=None):
        self.admits.append(len(prompts))
        if "endless" not in prompts:  # (as the endless stream of `stream_batch` never waits)
            self.held.entered.set()
            assert self.held.release.wait(TIMEOUT)
        got = self.live.admit(images, ["caption en" if p == "endless" else p for p in prompts], tags, streams,
                              options)
        if got is None:
            return None
        self.endless |= {q for q, p in zip(got[0], prompts) if p == "endless"}
        return got[0], self._filter(got[1])

    def step(self):
        events = self._filter(self.live.step())
        if self.endless:
            time.sleep(0.002)  # a throttle, not a synchronisation: it ends only when no one wants it
        return events + [(q, "more ") for q in self.endless]

    def _filter(self, events):
        return [(q, item) for q, item in events if q not in self.endless]

    def release(self, seq):
        if seq in self.endless:
            self.endless.discard(seq)
            self.held.closed.set()
        self.live.release(seq)


def demo_examples() -> list[dict]:
    """The bundled demo examples (demo.json), each with its `path` and its PIL `image`."""
    examples = json.loads((ASSETS / "demo.json").read_text())["examples"]
    for e in examples:
        e["path"] = ASSETS / e["image"]
        with Image.open(e["path"]) as im:
            e["image"] = im.convert("RGB")
    return examples


@contextmanager
def live_server(**kw):
    """A server on 127.0.0.1 (a free port) whose engine owns a pipeline of its own (a pipeline is never shared
    between threads: the expected answers come from another)."""
    engine = Engine(palitorch.load(), max_batch=8).start()
    with serving(new_server(engine, **kw)) as server:
        yield server
    engine.stop()
