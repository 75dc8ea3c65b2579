"""`palitorch serve`: answer OpenAI-style chat-completions requests over HTTP.

    palitorch serve --model DIR --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": [
        {"type": "text", "text": "caption en"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'
"""

from __future__ import annotations

import argparse
import faulthandler
import math
import os
import signal
import sys
import urllib.parse
from pathlib import Path

from palitorch.cli.common import (
    add_decoding_options,
    add_model_options,
    check_model_options,
    decoding_options,
    load_pipeline,
    one_line_errors,
)
from palitorch.errors import InputError, PalitorchError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-style HTTP API",
        description="Serve the model over an OpenAI-style HTTP API: POST /v1/chat/completions (one image and a "
                    "prompt per request; \"stream\": true for server-sent events), GET /v1/models, GET (or HEAD) "
                    "/health, GET /metrics (Prometheus). "
                    "Concurrent requests decode together, continuously batched: a request that arrives while a "
                    "batch runs joins it at the next step. The decoding options below are defaults for requests "
                    "that do not set them.",
    )
    one_line_errors(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="the model's name in the API (default: the --adapter folder's name, else the checkpoint "
                        "folder's)")
    g.add_argument("--api-key", metavar="KEY",
                   help="require the header 'Authorization: Bearer KEY' (default: $PALITORCH_API_KEY, else none)")
    g.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                   help="decode at most N requests' rows at once (default 8)")
    g.add_argument("--max-queue", type=int, default=1024, metavar="N",
                   help="refuse new requests (503) while N are waiting (default 1024)")
    g.add_argument("--no-fetch", action="store_true",
                   help="refuse http(s) image URLs: images must come inside the request as data URLs")
    g.add_argument("--fetch-private", action="store_true",
                   help="fetch image URLs at loopback and private addresses (127.0.0.1, 10.x, 192.168.x, ...); "
                        "off by default, also on 127.0.0.1, which a reverse proxy or tunnel may open to anyone "
                        "(link-local and cloud metadata addresses never)")
    g.add_argument("--max-body-mb", type=float, default=32, metavar="MB",
                   help="largest request body accepted, in MiB (default 32)")
    g.add_argument("--allow-origin", action="append", metavar="ORIGIN", dest="allow_origins",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000; * for any) call the API from a "
                        "browser: CORS headers for that origin (repeatable; default: none)")
    g.add_argument("--allow-host", action="append", metavar="NAME", dest="allow_hosts",
                   help="a server on a loopback address answers only requests whose Host header is localhost, an IP "
                        "address or this machine's name (against DNS rebinding): also answer NAME, e.g. the public "
                        "name a reverse proxy passes on (repeatable; * for any)")
    g.add_argument("--feature-cache-mb", type=float, default=128, metavar="MB",
                   help="keep the vision tower's output for the images seen last, up to MB MiB, so that a request "
                        "about an image seen lately skips the tower (default 128; 0: off)")
    g.add_argument("--quiet", action="store_true", help="no log line per request")
    add_model_options(p)
    add_decoding_options(p, text_only=True)
    p.set_defaults(func=serve)


def model_name(args: argparse.Namespace) -> str:
    from palitorch.checkpoint.hub import is_hub_id

    if args.served_model_name:
        return args.served_model_name
    if args.adapter and is_hub_id(args.adapter):  # a Hub id goes by the id, as vLLM names it
        return args.adapter
    if args.adapter:  # a fine-tuned model goes by its adapter's name; a palitorch run's (RUN/model/peft), the run's
        adapter = Path(args.adapter).expanduser().resolve()
        if adapter.name != "peft":
            return adapter.name
        folder = adapter.parent
        return folder.parent.name if folder.name == "model" else f"{folder.parent.name}-{folder.name}"
    if args.model and is_hub_id(args.model):
        return args.model
    return Path(args.model).expanduser().resolve().name if args.model else "palitorch-default"


def bind(args: argparse.Namespace, defaults: dict):
    """The listening socket, before the (slow) model load: a port in use is reported at once."""
    from palitorch.server import Server

    try:
        return Server((args.host, args.port), model_name(args), defaults,
                      api_key=args.api_key or os.environ.get("PALITORCH_API_KEY") or None,
                      fetch_images=not args.no_fetch, max_body=int(args.max_body_mb * (1 << 20)), quiet=args.quiet,
                      allow_origins=args.allow_origins, fetch_private=args.fetch_private,
                      allow_hosts=args.allow_hosts)
    except OSError as e:
        reason = e.strerror or str(e)
        raise InputError(f"cannot listen on {args.host}:{args.port}: {reason} (choose another --port or --host)") \
            from None


def check_origin(origin: str) -> None:
    """--allow-origin takes what a browser sends in its Origin header: scheme://host[:port], or * for any."""
    parts = urllib.parse.urlsplit(origin)
    if origin != "*" and not (parts.scheme in ("http", "https") and parts.netloc and not parts.path
                              and not parts.query and not parts.fragment):
        raise InputError(f"--allow-origin {origin!r}: give an origin as browsers send it, scheme://host[:port] "
                         "(e.g. http://localhost:3000, no path or trailing slash), or * for any")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _quit_now(signum, frame):
    """A second Ctrl-C (or SIGTERM) while the requests in progress finish: end the process at once. os._exit skips
    the interpreter's shutdown, which would free the model's tensors under the engine thread still using them."""
    sys.stdout.flush()
    sys.stderr.write("palitorch serve: stopped at once; the requests in progress were not answered\n")
    sys.stderr.flush()
    os._exit(130 if signum == signal.SIGINT else 143)


def serve(args: argparse.Namespace) -> int:
    from palitorch.inference.caches import batch_rung_below, batch_rungs
    from palitorch.server import ApiError, Engine

    defaults = decoding_options(args)
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be from 0 to 65535, got {args.port}")
    if args.max_batch_size < 1:
        raise InputError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_queue < 1:
        raise InputError(f"--max-queue must be >= 1, got {args.max_queue}")
    if not 0 < args.max_body_mb < math.inf:
        raise InputError(f"--max-body-mb must be a number > 0, got {args.max_body_mb}")
    if not 0 <= args.feature_cache_mb < math.inf:
        raise InputError(f"--feature-cache-mb must be a number >= 0, got {args.feature_cache_mb}")
    if args.no_fetch and args.fetch_private:
        raise InputError("--fetch-private lets the server fetch from private addresses, and --no-fetch lets it fetch "
                         "nothing: give one of them")
    for origin in args.allow_origins or ():
        check_origin(origin)
    max_batch = args.max_batch_size
    if args.compile and batch_rung_below(max_batch) != max_batch:  # the sizes a compiled pipeline runs batches at
        max_batch = batch_rung_below(max_batch)
        print(f"palitorch serve: --compile: batches of at most {max_batch} requests (compiled sizes are 1, 2, 3, "
              "4, 6, 8, 12, 16, ...)", file=sys.stderr)
    device, dtype = check_model_options(args)
    server = bind(args, defaults)
    engine = None
    # one write per line: the model's thread and the HTTP threads log side by side
    say = (lambda line: None) if args.quiet else (lambda line: sys.stderr.write(f"palitorch serve: {line}\n"))
    # A native crash (or an abort at exit) prints every thread's Python stack first, so that a report names the thread.
    faulthandler.enable()
    # SIGTERM (docker stop, systemd) ends the server as Ctrl-C does: the batch in progress finishes first.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background, where SIGINT comes ignored
    try:
        pipe = load_pipeline(args, device, dtype)
        pipe.feature_cache.resize(int(args.feature_cache_mb * (1 << 20)))
        engine = Engine(pipe, max_batch, log=say, max_queue=args.max_queue).start()
        server.engine = engine
        # A compiled step is compiled per batch size: compile every size a batch can run at before serving.
        sizes = batch_rungs(max_batch) if args.compile else [1]
        try:
            seconds = engine.warm_up(defaults, sizes)
        except ApiError as e:  # the model cannot answer at all (NaN logits from damaged weights, say)
            raise PalitorchError(f"the model failed its warm-up request, so it is not served: {e.message}") from None
        pipe.feature_cache.clear()  # (not the warm-up's image, nor its lookups)
        say(f"warmed up in {seconds:.1f} s" + (f" (decode step compiled for batch sizes {sizes})" if args.compile
                                               else ""))
        weights = f" with {args.quantize} weights" if args.quantize else ""
        print(f"palitorch serve: {server.model_id} on {device}{weights}, listening on {server.url}/v1 "
              "(Ctrl-C to stop)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, _quit_now)
        signal.signal(signal.SIGTERM, _quit_now)
        server.stop_listening()  # new clients are refused at once
        if engine is not None:  # the requests in progress are answered
            if engine.running or engine.held:
                say(f"stopping: finishing the {engine.running + engine.held} request(s) in progress (Ctrl-C again "
                    "to stop at once)")
            engine.stop()
        server.server_close()  # then the connections left open are ended
    print("palitorch serve: stopped", file=sys.stderr)
    return 0
