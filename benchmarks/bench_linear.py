"""A decode step's products, kernel by kernel, on CPU: a few rows times each decoder weight of a model, through
`F.linear` (MKL or OpenBLAS: what transformers calls), oneDNN's linear, and palitorch's `skinny_linear`
(palitorch/native), interleaved, medians. Which one `kernels.linear` picks on this machine is printed at the end.

    python benchmarks/bench_linear.py                        # the mid-size model's 48 weights, rows 1-8
    python benchmarks/bench_linear.py --size pg1-3b --rows 1,8 --reps 5
    python benchmarks/bench_linear.py --dtype bfloat16              # bfloat16 weights (no oneDNN column)

The weights are filled with ones (their values do not change the time) in the shapes of `--size`'s decoder
(fused q/k/v and gate/up, as palitorch runs them), 4 bytes an entry in float32: the 3B shapes take ~10 GB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inputs import SIZES, _config, _tokenizer  # noqa: E402

from palitorch import native  # noqa: E402
from palitorch.model import kernels  # noqa: E402


def decoder_shapes(size: str) -> list[tuple[int, int]]:
    t = _config(size, _tokenizer()).text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    layer = [(q + 2 * kv, t.hidden_size), (t.hidden_size, q), (2 * t.intermediate_size, t.hidden_size),
             (t.hidden_size, t.intermediate_size)]
    return layer * t.num_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="mid", choices=[s for s in SIZES if s != "bundled"])
    ap.add_argument("--rows", default="1,2,3,4,6,8", help="comma-separated row counts (default 1,2,3,4,6,8)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    dtype = getattr(torch, args.dtype)
    weights = [torch.ones(s, dtype=dtype) for s in decoder_shapes(args.size)]
    gb = sum(w.numel() * w.element_size() for w in weights) / 1e9
    fns = {"F.linear": F.linear}
    if dtype == torch.float32 and kernels._onednn_works():  # palitorch's oneDNN route takes float32 only
        fns["oneDNN"] = lambda x, w: kernels._pointwise(x, w, None)
    if native.load():
        fns["skinny"] = torch.ops.palitorch.skinny_linear
    print(f"{len(weights)} weights, {gb:.2f} GB {args.dtype}, {torch.get_num_threads()} threads; ms per pass "
          f"(GB/s), medians of {args.reps}")
    print(f"{'rows':>4}  " + "  ".join(f"{name:>16}" for name in fns))
    with torch.inference_mode():
        for m in rows:
            xs = {k: torch.randn(m, k, dtype=dtype) for k in {w.shape[1] for w in weights}}
            times: dict = {name: [] for name in fns}
            for _ in range(args.reps + 1):  # the first pass of each warms up and is dropped
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for w in weights:
                        fn(xs[w.shape[1]], w)
                    times[name].append(time.perf_counter() - start)
            cells = [f"{statistics.median(ts[1:]) * 1e3:>8.2f} ({gb / statistics.median(ts[1:]):>4.1f})"
                     for ts in times.values()]
            print(f"{m:>4}  " + "  ".join(f"{c:>16}" for c in cells), flush=True)
        onednn = kernels._min_rows() if dtype == torch.float32 and kernels._onednn_works() else "never"
        print(f"kernels.linear here: skinny_linear up to {kernels.skinny_max_rows(dtype)} rows; oneDNN from {onednn} "
              "rows")


if __name__ == "__main__":
    main()
