"""Serving throughput: many clients at once against `palitorch serve` (its HTTP server and engine, in this
process), with dynamic batching and without, beside transformers' `generate` answering the same requests one at a
time on the same weight tensors (a server built on it, with a lock around `generate`, does no better).

    python benchmarks/bench_serve.py [--size bundled] [--requests 48] [--clients 8] [--max-batch 8] [--compile]

palitorch's requests go over HTTP on this machine (JSON, a base64 PNG, the server's threads), so its figures include
what a client pays; transformers' include only the preprocessing (palitorch's processor) and `generate`. Greedy
decoding; answers end at EOS or --new-tokens (--force-length suppresses EOS: every answer is --new-tokens long).
The three must give the same answers, or no figures are reported. Modes are interleaved; medians of --reps.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
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
from palitorch.inference.generate import eos_ids  # noqa: E402
from palitorch.inference.pipeline import batch_rungs  # noqa: E402
from palitorch.server import Engine, Server  # noqa: E402


def request_bodies(images, prompts, new_tokens: int, force: bool, stream: bool = False) -> list[bytes]:
    bodies = []
    for image, prompt in zip(images, prompts):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"max_tokens": new_tokens, "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]}]}
        if force:
            body["min_tokens"] = new_tokens
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        bodies.append(json.dumps(body).encode())
    return bodies


def serve_all(url: str, bodies: list[bytes], clients: int) -> tuple[float, list[str], int]:
    """(seconds, answers, completion tokens) for every body posted by `clients` concurrent clients."""
    def post(body: bytes) -> dict:
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
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(post, bodies))
    seconds = time.perf_counter() - t0
    return seconds, [o["choices"][0]["message"]["content"] for o in out], sum(o["usage"]["completion_tokens"]
                                                                             for o in out)


def hf_all(hf, pipe, images, prompts, new_tokens: int, force: bool) -> tuple[float, list[str], int]:
    """transformers, one request at a time, preprocessing included (palitorch's processor, which is faster than
    transformers' own)."""
    proc, eos = pipe.processor, eos_ids(pipe.model, pipe.processor)
    answers, tokens = [], 0
    t0 = time.perf_counter()
    for image, prompt in zip(images, prompts):
        enc = proc.encode(prompt)
        ids = torch.tensor([enc.ids], device=pipe.device)
        types = torch.tensor([enc.types], device=pipe.device)  # the prefix-LM mask: PaliGemma 2 needs it
        pixels = proc.pixels(image)[None].to(pipe.device, pipe.dtype)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                              token_type_ids=types,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens if force else 0, do_sample=False,
                              eos_token_id=eos, pad_token_id=proc.pad_id)
        new = out[0, ids.shape[1]:].tolist()
        end = next((i for i, t in enumerate(new) if t in eos), None)
        tokens += len(new) if end is None else end + 1  # the EOS counts, as in the server's usage
        answers.append(proc.decode(new[:end]))
    return time.perf_counter() - t0, answers, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="bundled", help=f"one of {', '.join(SIZES)}, or a checkpoint folder")
    ap.add_argument("--requests", type=int, default=48, help="requests per run (default 48)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch-size (default 8)")
    ap.add_argument("--new-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    ap.add_argument("--force-length", action="store_true", help="suppress EOS: every answer is --new-tokens long")
    ap.add_argument("--stream", action="store_true", help="clients ask for streams (server-sent events)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each mode, interleaved (default 3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="compile palitorch's decode step (warmed up first)")
    ap.add_argument("--workdir", default="/tmp/palitorch-bench", help="where random benchmark weights are kept")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    if (why := check_size(args.size)) is not None:
        ap.error(why)
    for name in ("requests", "clients", "max_batch", "new_tokens", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    dtype = getattr(torch, args.dtype)
    folder, kind = checkpoint(args.size, Path(args.workdir), args.device, dtype)
    pipe = palitorch.load(folder, device=args.device, dtype=args.dtype)
    if args.compile:
        pipe.compile(mode="reduce-overhead" if args.device.startswith("cuda") else None)
    hf, _ = load_transformers(pipe, folder, dtype, torch.device(args.device))
    server = Server(("127.0.0.1", 0), "bench", quiet=True)
    server.engine = engine = Engine(pipe, args.max_batch).start()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    images, prompts = workload(args.requests)
    bodies = request_bodies(images, prompts, args.new_tokens, args.force_length, args.stream)

    def batched():
        engine.max_batch = args.max_batch
        return serve_all(server.url, bodies, args.clients)

    def unbatched():
        engine.max_batch = 1
        return serve_all(server.url, bodies, args.clients)

    def theirs():
        return hf_all(hf, pipe, images, prompts, args.new_tokens, args.force_length)

    modes = {f"palitorch serve, batches <= {args.max_batch}": batched, "palitorch serve, no batching": unbatched,
             "transformers generate, one at a time": theirs}
    print(f"{args.size} ({kind}), {args.device} {args.dtype}, {args.requests} requests from {args.clients} clients, "
          f"max_tokens {args.new_tokens}{' (EOS suppressed)' if args.force_length else ''}"
          f"{', streamed' if args.stream else ''}")
    sizes = batch_rungs(args.max_batch)
    print(f"  warm-up ({'compiling ' if args.compile else ''}batch sizes {sizes}) ...", flush=True)
    engine.warm_up({"max_new_tokens": args.new_tokens}, sizes)
    answers = {name: fn()[1] for name, fn in modes.items()}  # warm runs, and the answers to compare
    first = next(iter(answers.values()))
    differ = [name for name, a in answers.items() if a != first]
    if differ:
        bad = next(i for i, (x, y) in enumerate(zip(first, answers[differ[0]])) if x != y)
        print(f"ANSWERS DIFFER ({differ[0]}, request {bad}: {first[bad]!r} vs {answers[differ[0]][bad]!r}): "
              "no figures reported")
        sys.exit(1)
    print(f"  answers: the same in all three modes ({len(set(first))} distinct of {len(first)})")
    runs = {name: [] for name in modes}
    for _ in range(args.reps):
        for name, fn in modes.items():
            seconds, _, tokens = fn()
            runs[name].append((seconds, tokens))
    rows = []
    base = statistics.median(s for s, _ in runs["transformers generate, one at a time"])
    for name, rs in runs.items():
        seconds = statistics.median(s for s, _ in rs)
        row = {"mode": name, "seconds": seconds, "requests_per_s": args.requests / seconds,
               "tokens_per_s": rs[0][1] / seconds, "x_transformers": base / seconds}
        rows.append(row)
        print(f"  {name:<40} {row['requests_per_s']:8.1f} req/s {row['tokens_per_s']:9.1f} tok/s "
              f"{row['x_transformers']:6.2f}x")
    print(f"  largest batch the server formed: {engine.stats['largest_batch']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    server.shutdown()
    engine.stop()


if __name__ == "__main__":
    main()
