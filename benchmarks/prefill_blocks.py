"""A prefill run whole against in blocks, in one process: its MLP blocks in blocks of rows
(`kernels.in_row_blocks`) and Gemma 2's explicit attention in blocks of query positions
(`Attention._explicit_in_blocks`). The same pipeline, the two byte budgets switched between passes, interleaved,
medians; both ways must give the same greedy tokens.

    python benchmarks/prefill_blocks.py                                   # mid-size model, float32, batch 8
    python benchmarks/prefill_blocks.py --size pg1-3b --dtype bfloat16 --batches 1 --reps 3

Times `generate` with one new token (image preprocessing, vision tower, prefill, the first token), as
bench_generate.py times a prefill; prints ms, whole / blocks, and their ratio. This is how session 20 measured the
blocks (BENCHMARKS.md): on the project's VMs separate processes differ by more than such a change.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inputs import SIZES, check_size, checkpoint, workload  # noqa: E402

import palitorch  # noqa: E402
from palitorch.model import gemma, kernels  # noqa: E402

WHOLE = 1 << 62  # a budget no prefill reaches: every MLP block and attention in one piece


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--size", default="mid", help=f"one of {', '.join(SIZES)}, or a checkpoint folder (default mid)")
    ap.add_argument("--batches", default="8", help="comma-separated batch sizes (default 8)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "palitorch-bench"))
    args = ap.parse_args()
    if error := check_size(args.size):
        ap.error(error)
    path, _ = checkpoint(args.size, Path(args.workdir), "cpu", getattr(torch, args.dtype))
    pipe = palitorch.load(path, dtype=args.dtype)
    pipe.feature_cache.resize(0)  # every repetition runs the vision tower, as transformers' do
    pipe.model.language_model.fuse_projections()  # as `Pipeline.compile` does (prefills run eagerly either way)
    blocks, scores = kernels.ROW_BLOCK_BYTES, gemma.SCORE_BLOCK_BYTES
    print(f"{args.size}, {args.dtype}, {torch.get_num_threads()} threads; MLP blocks of at most "
          f"{blocks / 2**20:g} MB of intermediate (at least {kernels.ROW_BLOCK_MIN_ROWS} rows), explicit attention's "
          f"of at most {scores / 2**20:g} MB of scores")

    def run(images, prompts, budget: int, n: int = 1):
        kernels.ROW_BLOCK_BYTES = budget
        gemma.SCORE_BLOCK_BYTES = scores if budget == blocks else budget
        start = time.perf_counter()
        out = pipe.generate(images, prompts, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - start, [r.token_ids for r in out]

    try:
        for b in (int(x) for x in args.batches.split(",")):
            images, prompts = workload(b)
            answers = [run(images, prompts, budget, n=8)[1] for budget in (WHOLE, blocks)]  # warm, and compare
            if answers[0] != answers[1]:
                sys.exit(f"batch {b}: the tokens differ whole and in blocks; no timing reported")
            times: dict = {WHOLE: [], blocks: []}
            for _ in range(args.reps):
                for budget, ts in times.items():
                    ts.append(run(images, prompts, budget)[0])
            whole, split = (statistics.median(times[k]) * 1e3 for k in (WHOLE, blocks))
            print(f"batch {b}: whole {whole:.0f} ms, in row blocks {split:.0f} ms, x{whole / split:.3f} "
                  f"(same tokens; medians of {args.reps})", flush=True)
    finally:
        kernels.ROW_BLOCK_BYTES, gemma.SCORE_BLOCK_BYTES = blocks, scores


if __name__ == "__main__":
    main()
