"""Serving throughput and latency: many clients at once against `palitorch serve` (its HTTP server and engine, in
this process) with continuous batching, with static batching (each batch run to its end; requests that arrive
meanwhile wait), and without batching, beside transformers' `generate` answering the same requests one at a time on
the same weight tensors (a server built on it, with a lock around `generate`, does no better).

    python benchmarks/bench_serve.py [--size bundled] [--requests 48] [--clients 8] [--max-batch 8] [--compile]
    python benchmarks/bench_serve.py --rate 20     # requests arrive at random (Poisson), 20 a second on average

By default --clients clients each send their next request when the last is answered; with --rate, each request is
sent at its own time whatever the server is doing, and the latency a client sees includes any wait in the queue.

palitorch's requests go over HTTP on this machine (JSON, a base64 PNG, the server's threads), so its figures include
what a client pays; transformers' include only the preprocessing (palitorch's processor) and `generate`. Greedy
decoding; answers end at EOS or --new-tokens (--force-length suppresses EOS: every answer is --new-tokens long;
--vary-length gives each request its own max_tokens, from 1 to --new-tokens; --mix-sampling makes every other
request sampled, with top_k 1 so that its draw is certain and all modes still give the same answers).
All modes must give the same answers, or no figures are reported. Modes are interleaved; medians of --reps.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import random
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import load_transformers  # noqa: E402
from inputs import SIZES, check_size, checkpoint, workload  # noqa: E402

import palitorch  # noqa: E402
from palitorch.inference.caches import batch_rungs  # noqa: E402
from palitorch.inference.generate import eos_ids  # noqa: E402
from palitorch.model import kernels  # noqa: E402
from palitorch.server import Engine, Server  # noqa: E402


def lengths(n: int, new_tokens: int, vary: bool) -> list[int]:
    """Each request's max_tokens: --new-tokens, or with --vary-length drawn from 1..--new-tokens (the same draws in
    every run)."""
    rng = random.Random(1)
    return [rng.randint(1, new_tokens) if vary else new_tokens for _ in range(n)]


SAMPLED = {"temperature": 0.7, "top_k": 1}  # --mix-sampling: a sampled request whose draw is certain


def request_bodies(images, prompts, limits: list[int], force: bool, stream: bool = False,
                   mix: bool = False) -> list[bytes]:
    bodies = []
    for i, (image, prompt, new_tokens) in enumerate(zip(images, prompts, limits)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"max_tokens": new_tokens, "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]}]}
        if force:
            body["min_tokens"] = new_tokens
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if mix and i % 2:
            body.update(SAMPLED)
        bodies.append(json.dumps(body).encode())
    return bodies


def serve_all(url: str, bodies: list[bytes], clients: int, rate: float | None = None):
    """(seconds, answers, completion tokens, each request's latency in seconds) for every body, posted by `clients`
    concurrent clients or, with `rate`, each at its time in a Poisson process of `rate` requests a second (the same
    times in every run)."""
    gaps = random.Random(0).expovariate
    starts = list(itertools.accumulate(gaps(rate) for _ in bodies)) if rate else None

    def post(i: int) -> tuple[dict, float]:
        if starts:
            time.sleep(max(0.0, t0 + starts[i] - time.perf_counter()))
        sent = time.perf_counter()
        return answer(bodies[i]), time.perf_counter() - sent

    def answer(body: bytes) -> dict:
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            if r.headers["Content-Type"] != "text/event-stream":
                return json.load(r)
            # a stream: read the events as they come, and put the answer together as a client does
            text, usage = "", None
            for line in r:
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    text += "".join(c["delta"].get("content", "") for c in event["choices"])
                    usage = event.get("usage") or usage
            return {"choices": [{"message": {"content": text}}], "usage": usage}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(bodies) if rate else clients) as pool:
        out = list(pool.map(post, range(len(bodies))))
    seconds = time.perf_counter() - t0
    return (seconds, [o["choices"][0]["message"]["content"] for o, _ in out],
            sum(o["usage"]["completion_tokens"] for o, _ in out), [lat for _, lat in out])


def hf_all(hf, pipe, images, prompts, limits: list[int], force: bool, mix: bool = False):
    """transformers, one request at a time, preprocessing included (palitorch's processor, which is faster than
    transformers' own)."""
    proc, eos = pipe.processor, eos_ids(pipe.model, pipe.processor)
    answers, tokens = [], 0
    t0 = time.perf_counter()
    for i, (image, prompt, new_tokens) in enumerate(zip(images, prompts, limits)):
        enc = proc.encode(prompt)
        choice = {"do_sample": True, **SAMPLED} if mix and i % 2 else {"do_sample": False}
        ids = torch.tensor([enc.ids], device=pipe.device)
        types = torch.tensor([enc.types], device=pipe.device)  # the prefix-LM mask: PaliGemma 2 needs it
        pixels = proc.pixels(image)[None].to(pipe.device, pipe.dtype)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                              token_type_ids=types,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens if force else 0, **choice,
                              eos_token_id=eos, pad_token_id=proc.pad_id)
        new = out[0, ids.shape[1]:].tolist()
        end = next((i for i, t in enumerate(new) if t in eos), None)
        tokens += len(new) if end is None else end + 1  # the EOS counts, as in the server's usage
        answers.append(proc.decode(new[:end]))
    return time.perf_counter() - t0, answers, tokens, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="bundled", help=f"one of {', '.join(SIZES)}, or a checkpoint folder")
    ap.add_argument("--requests", type=int, default=48, help="requests per run (default 48)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--rate", type=float, help="send requests at random times, this many a second on average "
                    "(instead of --clients waiting for their answers)")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch-size (default 8)")
    ap.add_argument("--new-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    ap.add_argument("--force-length", action="store_true", help="suppress EOS: every answer is --new-tokens long")
    ap.add_argument("--vary-length", action="store_true", help="each request's max_tokens drawn from 1..--new-tokens")
    ap.add_argument("--mix-sampling", action="store_true",
                    help="every other request sampled (top_k 1: a certain draw, the greedy answer)")
    ap.add_argument("--stream", action="store_true", help="clients ask for streams (server-sent events)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each mode, interleaved (default 3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="compile palitorch's decode step (warmed up first)")
    ap.add_argument("--no-skinny", action="store_true",
                    help="palitorch without its own kernel for a few rows by a large CPU weight (palitorch.native)")
    ap.add_argument("--workdir", default="/tmp/palitorch-bench", help="where random benchmark weights are kept")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    if (why := check_size(args.size)) is not None:
        ap.error(why)
    for name in ("requests", "clients", "max_batch", "new_tokens", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rate is not None and not args.rate > 0:
        ap.error("--rate must be > 0 (requests a second)")

    kernels.use_skinny(not args.no_skinny)
    dtype = getattr(torch, args.dtype)
    folder, kind = checkpoint(args.size, Path(args.workdir), args.device, dtype)
    pipe = palitorch.load(folder, device=args.device, dtype=args.dtype)
    pipe.feature_cache.resize(0)  # every repetition runs the vision tower, as transformers' do
    if args.compile:
        pipe.compile(mode="reduce-overhead" if args.device.startswith("cuda") else None)
    hf, _ = load_transformers(pipe, folder, dtype, torch.device(args.device))
    server = Server(("127.0.0.1", 0), "bench", quiet=True)
    server.engine = engine = Engine(pipe, args.max_batch).start()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    images, prompts = workload(args.requests)
    new_tokens = lengths(args.requests, args.new_tokens, args.vary_length)
    bodies = request_bodies(images, prompts, new_tokens, args.force_length, args.stream, args.mix_sampling)

    def serving(max_batch: int, continuous: bool = True):
        def run():
            engine.max_batch, engine.continuous = max_batch, continuous
            return serve_all(server.url, bodies, args.clients, args.rate)
        return run

    def theirs():
        return hf_all(hf, pipe, images, prompts, new_tokens, args.force_length, args.mix_sampling)

    modes = {f"palitorch serve, continuous <= {args.max_batch}": serving(args.max_batch),
             f"palitorch serve, static <= {args.max_batch}": serving(args.max_batch, continuous=False),
             "palitorch serve, no batching": serving(1), "transformers generate, one at a time": theirs}
    senders = f"arriving at {args.rate:g}/s" if args.rate else f"from {args.clients} clients"
    print(f"{args.size} ({kind}), {args.device} {args.dtype}, {args.requests} requests {senders}, "
          f"max_tokens {'1 to ' * args.vary_length}{args.new_tokens}{' (EOS suppressed)' * args.force_length}"
          f"{', streamed' if args.stream else ''}{', every other request sampled' * args.mix_sampling}"
          f"{', no skinny kernel' * args.no_skinny}")
    sizes = batch_rungs(args.max_batch)
    print(f"  warm-up ({'compiling ' if args.compile else ''}batch sizes {sizes}) ...", flush=True)
    engine.warm_up({"max_new_tokens": args.new_tokens}, sizes)
    engine.continuous = False
    engine.warm_up({"max_new_tokens": args.new_tokens}, sizes)  # static batches compile their own step
    answers = {name: fn()[1] for name, fn in modes.items()}  # warm runs, and the answers to compare
    first = next(iter(answers.values()))
    differ = [name for name, a in answers.items() if a != first]
    if differ:
        bad = next(i for i, (x, y) in enumerate(zip(first, answers[differ[0]])) if x != y)
        print(f"ANSWERS DIFFER ({differ[0]}, request {bad}: {first[bad]!r} vs {answers[differ[0]][bad]!r}): "
              "no figures reported")
        if args.dtype != "float32":  # batching changes how 16-bit numbers round (BENCHMARKS.md, session 15)
            print(f"  in {args.dtype} an answer may depend on what it is batched with (attention over padded rows and "
                  "batched products round differently, and random weights have near-ties): compare in float32")
        sys.exit(1)
    print(f"  answers: the same in all {len(modes)} modes ({len(set(first))} distinct of {len(first)})")
    runs = {name: [] for name in modes}
    for _ in range(args.reps):
        for name, fn in modes.items():
            runs[name].append(fn())
    rows = []
    base = statistics.median(r[0] for r in runs["transformers generate, one at a time"])
    print(f"  {'':<40} {'req/s':>8} {'tok/s':>9} {'x hf':>6} {'latency p50 / p90 ms':>22}")
    for name, rs in runs.items():
        seconds = statistics.median(r[0] for r in rs)
        row = {"mode": name, "seconds": seconds, "requests_per_s": args.requests / seconds,
               "tokens_per_s": rs[0][2] / seconds, "x_transformers": base / seconds}
        latency = ""
        if rs[0][3] is not None:  # per run, then the median over runs
            for q in (50, 90):
                row[f"latency_p{q}_ms"] = statistics.median(1e3 * percentile(r[3], q) for r in rs)
            latency = f"{row['latency_p50_ms']:10.0f} / {row['latency_p90_ms']:<9.0f}"
        rows.append(row)
        print(f"  {name:<40} {row['requests_per_s']:8.1f} {row['tokens_per_s']:9.1f} {row['x_transformers']:6.2f}"
              f" {latency}")
    print(f"  largest batch the server formed: {engine.stats['largest_batch']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    server.shutdown()
    engine.stop()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, by linear interpolation between the nearest ranks."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


if __name__ == "__main__":
    main()
