"""What int8 weights buy: palitorch with `quantize="int8"` against palitorch on the same checkpoint in full precision,
in one process, runs interleaved.

    python benchmarks/quantized.py --sizes bundled,mid --batches 1,8
    python benchmarks/quantized.py --sizes pg1-3b --dtype bfloat16 --batches 1 --reps 3      # ~10 GB of memory

For each size (as in bench_generate.py: random weights made so that answers vary, or a checkpoint folder) and batch
size: both pipelines compiled (`pipe.compile()`, the first call of each apart; --no-compile: eager), then per rep
prefill (a run of 1 token) and decode (ms per token from runs of 1 and N tokens, EOS suppressed), alternating the
two pipelines; medians. Also: the decoder's weight bytes in each, and how far the int8 model's greedy answers follow
the full model's (tokens equal up to the first difference, and the largest |logprob difference| before it). The int8
model is another model (its weights are rounded), so its tokens may part from the full model's; its parity with the
dequantized weights is tests/inference/test_quantized.py's, and bench_generate.py --quantize int8 times it against
transformers on them.
Writes a JSON record.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inputs import SIZES, check_size, checkpoint, workload  # noqa: E402
from measure import decoder_bytes, sync  # noqa: E402

import palitorch  # noqa: E402


def agreement(full, int8) -> dict:
    """Tokens in common before the first difference (all rows), and the largest |logprob gap| over them."""
    same, gap, total = 0, 0.0, 0
    for a, b in zip(full, int8):
        k = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        same, total = same + k, total + len(a.token_ids)
        gap = max([gap, *(abs(x - y) for x, y in zip(a.logprobs[:k], b.logprobs[:k]))])
    return {"tokens_before_first_difference": same, "tokens": total, "max_logprob_gap": gap}


def bench(size: str, args, workdir: Path) -> dict:
    dtype = getattr(torch, args.dtype)
    folder, kind = checkpoint(size, workdir, args.device, dtype)
    pipes = {name: palitorch.load(folder, device=args.device, dtype=args.dtype, quantize=q)
             for name, q in (("full", None), ("int8", "int8"))}
    for p in pipes.values():
        p.feature_cache.resize(0)  # every repetition runs the vision tower
    for p in pipes.values() if args.compile else ():
        p.compile()
    result = {"size": size, "weights": kind, "decoder_bytes": {k: decoder_bytes(p.model.language_model)
                                                               for k, p in pipes.items()}, "rows": []}
    print(f"{Path(size).name}: decoder weights {result['decoder_bytes']['full'] / 1e6:,.1f} MB {args.dtype}, "
          f"{result['decoder_bytes']['int8'] / 1e6:,.1f} MB int8")
    n = args.new_tokens
    for b in args.batches:
        images, prompts = workload(b)

        def run(pipe, k, images=images, prompts=prompts):
            sync(pipe.device)
            t0 = time.perf_counter()
            out = pipe.generate(images, prompts, max_new_tokens=k, min_new_tokens=k)
            sync(pipe.device)
            return time.perf_counter() - t0, out

        first = {name: run(p, n)[0] for name, p in pipes.items()}  # compiles this batch size
        answers = {name: run(p, n)[1] for name, p in pipes.items()}
        times = {f"{name}_{k}": [] for name in pipes for k in (1, n)}
        for _ in range(args.reps):
            for name, p in pipes.items():
                for k in (1, n):
                    times[f"{name}_{k}"].append(run(p, k)[0])
        med = {key: statistics.median(v) for key, v in times.items()}
        row = {"batch": b, "new_tokens": n, "first_call_s": first, **agreement(answers["full"], answers["int8"])}
        for name in pipes:
            row[f"{name}_prefill_ms"] = med[f"{name}_1"] * 1e3
            row[f"{name}_decode_tok_s"] = b * (n - 1) / (med[f"{name}_{n}"] - med[f"{name}_1"])
        row["decode_speedup"] = row["int8_decode_tok_s"] / row["full_decode_tok_s"]
        row["prefill_ratio"] = row["full_prefill_ms"] / row["int8_prefill_ms"]
        result["rows"].append(row)
        print(f"  batch {b}: prefill {row['full_prefill_ms']:,.1f} / {row['int8_prefill_ms']:,.1f} ms "
              f"({row['prefill_ratio']:.2f}x); decode {row['full_decode_tok_s']:,.1f} / {row['int8_decode_tok_s']:,.1f}"
              f" tok/s ({row['decode_speedup']:.2f}x); greedy tokens the same for "
              f"{row['tokens_before_first_difference']} of {row['tokens']} (to the first difference; |logprob gap| "
              f"there <= {row['max_logprob_gap']:.3f})",
              flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="bundled,mid",
                    help=f"comma-separated: {', '.join(SIZES)}, or checkpoint folders")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="both pipelines with pipe.compile() (the default) or eager")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "palitorch-bench"))
    ap.add_argument("--json", default="benchmarks/results/quantized.json")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    if errors := [e for e in map(check_size, sizes) if e]:
        ap.error(errors[0])
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.new_tokens < 2 or args.reps < 1:
        ap.error("--new-tokens must be at least 2 and --reps at least 1")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cpu = f"CPU, {torch.get_num_threads()} threads"
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    record = {"machine": machine, "torch": torch.__version__, "device": args.device, "dtype": args.dtype,
              "command": " ".join(sys.argv), "results": [bench(s, args, workdir) for s in sizes]}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
