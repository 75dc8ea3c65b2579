"""A chat about one image: several prompts in turn, each a request of its own (as `palitorch chat` and a server's
clients send them). With its cache of image features (palitorch/inference/features.py) palitorch runs the vision
tower for the first prompt only; without it, and in transformers' `generate`, every prompt encodes the image again.

Each round takes a new image and asks it the prompts with the cache, without it, and through transformers (on the
same weights, palitorch's preprocessing), interleaved. With and without the cache the greedy tokens must be the
same; transformers' too, up to a near-tie in 16-bit dtypes (measure.default_tie_tol). Prints the
medians of the first request's time (the image is new to all three) and of the later ones', and their ratios.

    python benchmarks/feature_cache.py --size mid --rounds 5
    python benchmarks/feature_cache.py --size pg1-3b --dtype bfloat16 --rounds 2 --prompts 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_generate import load_transformers  # noqa: E402
from inputs import PROMPTS, SIZES, check_size, checkpoint, workload  # noqa: E402
from measure import default_tie_tol  # noqa: E402

import palitorch  # noqa: E402
from palitorch.inference.features import DEFAULT_BYTES  # noqa: E402
from palitorch.inference.generate import eos_ids  # noqa: E402


def ours(pipe, image, prompts: list[str], new_tokens: int) -> tuple[list[float], list[list[int]]]:
    times, answers = [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        r = pipe.generate(image, prompt, max_new_tokens=new_tokens)
        times.append(time.perf_counter() - t0)
        answers.append(r.token_ids)
    return times, answers


def theirs(hf, pipe, image, prompts: list[str], new_tokens: int) -> tuple[list[float], list[list[int]], list]:
    """transformers' times and greedy answers, and each answer's log-probabilities [steps, V] (for `agree`)."""
    proc, eos = pipe.processor, eos_ids(pipe.model, pipe.processor)
    times, answers, logprobs = [], [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        enc = proc.encode(prompt)
        ids = torch.tensor([enc.ids], device=pipe.device)
        pixels = proc.pixels(image)[None].to(pipe.device, pipe.dtype)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                              token_type_ids=torch.tensor([enc.types], device=pipe.device), do_sample=False,
                              max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=proc.pad_id,
                              output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        times.append(time.perf_counter() - t0)
        end = next((i for i, t in enumerate(new) if t in eos), None)
        answers.append(new if end is None else new[:end])
        logprobs.append(torch.log_softmax(torch.stack(out.logits)[:, 0].float(), -1))
    return times, answers, logprobs


def agree(ours: list[int], theirs: list[int], logprobs: torch.Tensor, tol: float) -> bool:
    """Greedy answers agree: the same tokens, or the same up to a step where transformers' choice and ours are
    within `tol` nats under its own log-probabilities (a near-tie that 16-bit rounding may settle either way)."""
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if k is None:
        return len(ours) == len(theirs)
    return float(logprobs[k, theirs[k]] - logprobs[k, ours[k]]) <= tol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--size", default="mid", help=f"one of {', '.join(SIZES)}, or a checkpoint folder (default mid)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per image (default 4)")
    ap.add_argument("--new-tokens", type=int, default=8, help="at most this many tokens per answer (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="images, each asked every prompt three ways (default 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures here")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "palitorch-bench"))
    args = ap.parse_args()
    if error := check_size(args.size):
        ap.error(error)
    if min(args.prompts, args.new_tokens, args.rounds) < 1 or args.prompts < 2:
        ap.error("--prompts must be >= 2, --new-tokens and --rounds >= 1")
    dtype = getattr(torch, args.dtype)
    tol = default_tie_tol(dtype)
    folder, kind = checkpoint(args.size, Path(args.workdir), "cpu", dtype)
    pipe = palitorch.load(folder, dtype=args.dtype)
    hf, _ = load_transformers(pipe, folder, dtype, torch.device("cpu"))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    images = workload(args.rounds + 1)[0]
    pipe.generate(images[-1], prompts[0], max_new_tokens=2)  # warm-up (kernel choices, first allocations)
    first = {k: [] for k in ("cached", "uncached", "transformers")}
    later = {k: [] for k in first}
    for image in images[:args.rounds]:
        runs = {}
        for name in first:
            if name == "transformers":
                *runs[name], hf_logprobs = theirs(hf, pipe, image, prompts, args.new_tokens)
                continue
            pipe.feature_cache.resize(DEFAULT_BYTES if name == "cached" else 0)
            pipe.feature_cache.clear()
            runs[name] = ours(pipe, image, prompts, args.new_tokens)
        answers = {name: a for name, (_, a) in runs.items()}
        if answers["cached"] != answers["uncached"]:  # the cache must change nothing
            raise SystemExit(f"the cache changed the answers, so no speed is reported: {answers}")
        if not all(agree(a, b, lp, tol) for a, b, lp in zip(answers["cached"], answers["transformers"], hf_logprobs)):
            raise SystemExit(f"palitorch and transformers gave different tokens, so no speed is reported: {answers}")
        for name, (times, _) in runs.items():
            first[name].append(times[0])
            later[name] += times[1:]
    med = {k: {"first_ms": statistics.median(first[k]) * 1e3, "later_ms": statistics.median(later[k]) * 1e3}
           for k in first}
    c, u, t = (med[k]["later_ms"] for k in ("cached", "uncached", "transformers"))
    print(f"{args.size} ({kind}), cpu {args.dtype}, {torch.get_num_threads()} threads; {args.prompts} prompts per "
          f"image, up to {args.new_tokens} new tokens, {args.rounds} rounds; the same tokens three ways"
          f"{f' (up to near-ties within {tol} nats)' * (tol > 0)}")
    print("| | first request ms | later requests ms |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v['first_ms']:.1f} | {v['later_ms']:.1f} |")
    print(f"later requests: cached {u / c:.2f}x uncached, {t / c:.2f}x transformers (uncached {t / u:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "weights": kind, "dtype": args.dtype,
                                               "prompts": args.prompts, "new_tokens": args.new_tokens,
                                               "rounds": args.rounds, "medians": med}, indent=1) + "\n")


if __name__ == "__main__":
    main()
