"""A/B: greedy decoding with top_logprobs=3 on a compiled pipeline, the fused `greedy_top` step against the compiled
logits step followed by the choice and alternatives in eager ops (what ran before session 21), interleaved in one
process, medians after a warm-up; the two must give the same tokens.

    python benchmarks/top_logprobs_ab.py [--model CHECKPOINT_FOLDER] [--batches 1,8] [--reps 6]
"""

import argparse
import dataclasses
import statistics
import time

import torch
from PIL import Image

import palitorch
from palitorch.inference import generate as engine
from palitorch.inference.sampling import MAX_TOP_LOGPROBS


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint folder (default: the bundled model)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    pipe = palitorch.load(args.model).compile()
    size = pipe.processor.image_size
    img = Image.new("RGB", (size, size), (0, 128, 128))
    fused = pipe._steps

    def before(model, tokens, pos, slot, valid, sliding, done, no_eos, eos, pad_id):
        x = fused.logits(model, tokens, pos, slot, valid, sliding).float()
        tok = torch.where(no_eos, x.index_fill(-1, eos, float("-inf")), x).argmax(-1)
        lp, (ids, values) = engine.chosen_logprobs(x, tok, MAX_TOP_LOGPROBS)
        return *engine.settle(tok, lp, done, eos, pad_id), ids, values

    variants = {"fused": fused, "before": dataclasses.replace(fused, greedy_top=before)}
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        times, tokens = {k: [] for k in variants}, {}
        for rep in range(args.reps + 1):  # the first round compiles and warms up
            for name, steps in variants.items():
                pipe._steps = steps
                start = time.perf_counter()
                rs = pipe.generate([img] * b, ["caption en"] * b, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, top_logprobs=3)
                if rep:
                    times[name].append(time.perf_counter() - start)
                tokens[name] = [(r.token_ids, [[i for i, _ in s] for s in r.top_logprobs]) for r in rs]
        if tokens["fused"] != tokens["before"]:
            raise SystemExit(f"batch {b}: the two steps chose different tokens or alternatives; no timing reported")
        f, o = (statistics.median(times[k]) * 1e3 for k in ("fused", "before"))
        rows.append({"batch": b, "fused_ms": f, "before_ms": o})
        print(f"batch {b}: fused {f:.1f} ms, before {o:.1f} ms, {o / f:.2f}x "
              f"({args.new_tokens} tokens, top_logprobs=3, prefill included)")
    return rows


if __name__ == "__main__":
    main()
