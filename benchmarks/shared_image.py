"""One image with several prompts: palitorch preprocesses it and runs the vision tower once for the batch. Times
`pipe.generate(image, B prompts)` against the same batch with B separate copies of the image (each encoded), with
one new token (so mostly the prefill), interleaved, medians.

    python benchmarks/shared_image.py --size bundled --batch 8 --reps 30
    python benchmarks/shared_image.py --size mid --batch 8 --reps 3
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

from inputs import PROMPTS, SIZES, check_size, checkpoint, workload  # noqa: E402

import palitorch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--size", default="bundled",
                    help=f"one of {', '.join(SIZES)}, or a checkpoint folder (default bundled)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "palitorch-bench"))
    args = ap.parse_args()
    if error := check_size(args.size):
        ap.error(error)
    folder, _ = checkpoint(args.size, Path(args.workdir), "cpu", torch.float32)
    pipe = palitorch.load(folder)
    pipe.feature_cache.resize(0)  # the copies are encoded each (features.py would find them alike)
    image = workload(1)[0][0]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    runs = {
        "shared": lambda: pipe.generate(image, prompts, max_new_tokens=1),
        "copies": lambda: pipe.generate([image.copy() for _ in prompts], prompts, max_new_tokens=1),
    }
    answers = {name: [r.token_ids for r in run()] for name, run in runs.items()}  # warm-up, and the same answers
    if answers["shared"] != answers["copies"]:
        raise SystemExit("the shared image gave other answers than its copies")
    times = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    shared, copies = (statistics.median(times[k]) * 1e3 for k in ("shared", "copies"))
    print(f"{args.size}, batch {args.batch}, one new token: one shared image {shared:.1f} ms, "
          f"{args.batch} copies {copies:.1f} ms ({copies / shared:.2f}x); same answers")


if __name__ == "__main__":
    main()
