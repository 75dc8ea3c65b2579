"""Two versions of palitorch's CPU kernel side by side, in one process: the source at a git revision against the
working tree's, each built as palitorch builds it (`palitorch.native`) under its own op name, timed interleaved
on a model's decoder weights, and checked to give the same numbers to the bit (a change of speed only).

    python benchmarks/kernel_ab.py --base HEAD~1                     # mid-size weights, float32, rows 1,2,4,8
    python benchmarks/kernel_ab.py --base HEAD~1 --dtype bfloat16 --size pg1-3b --rows 1,8

This is how session 19 chose the kernel's streams per row count (BENCHMARKS.md): separate processes on the
project's VMs differ by more than such a change (memory placement, huge pages, neighbours), so a comparison runs
both builds on the same weights, pass after pass. Prints ms per pass over all the weights, medians of --reps.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_linear import decoder_shapes  # noqa: E402
from inputs import SIZES  # noqa: E402

from palitorch import native  # noqa: E402
from palitorch.model import kernels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "palitorch/native/skinny_linear.cpp"


def build(source: str, name: str, folder: Path) -> None:
    """Compile `source` (the kernel's text) with palitorch's build command, its ops renamed to torch.ops.`name`,
    and load it."""
    renamed = source.replace("TORCH_LIBRARY_FRAGMENT(palitorch, m)", f"TORCH_LIBRARY({name}, m)")
    renamed = renamed.replace("TORCH_LIBRARY_IMPL(palitorch, ", f"TORCH_LIBRARY_IMPL({name}, ")
    src, out = folder / f"{name}.cpp", folder / f"{name}.so"
    src.write_text(renamed)
    done = subprocess.run(native._command("c++", src, out), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(f"kernel_ab: building {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    torch.ops.load_library(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision of the kernel to compare with (default HEAD)")
    ap.add_argument("--size", default="mid", choices=SIZES, help="whose decoder weights (default mid)")
    ap.add_argument("--rows", default="1,2,4,8", help="comma-separated row counts (default 1,2,4,8)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--reps", type=int, default=9, help="interleaved passes per row count; medians (default 9)")
    args = ap.parse_args()
    try:
        base = subprocess.run(["git", "show", f"{args.base}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"kernel_ab: cannot read {SOURCE} at {args.base!r}: {e.stderr.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        build(base, "kernel_base", Path(tmp))
        build((ROOT / SOURCE).read_text(), "kernel_new", Path(tmp))
    ops = {"base": torch.ops.kernel_base.skinny_linear, "new": torch.ops.kernel_new.skinny_linear}
    dtype = getattr(torch, args.dtype)
    weights = [torch.randn(n, k, dtype=dtype) for n, k in decoder_shapes(args.size)]
    kernels.use_huge_pages(weights)  # as a compiled pipeline keeps them
    gb = sum(w.numel() * w.element_size() for w in weights) / 1e9
    print(f"{args.size}: {len(weights)} weights, {gb:.2f} GB {args.dtype}, {torch.get_num_threads()} threads; "
          f"{args.base} vs the working tree, ms per pass, medians of {args.reps}")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k, dtype=dtype) for k in {w.shape[1] for w in weights}}
        for w in weights[:4]:
            if not torch.equal(ops["base"](xs[w.shape[1]], w), ops["new"](xs[w.shape[1]], w)):
                print(f"  rows {rows}: the two builds' numbers differ (a change of arithmetic, not of speed only)")
                break
        times = {name: [] for name in ops}
        for _ in range(args.reps):
            for name, op in ops.items():
                t0 = time.perf_counter()
                for w in weights:
                    op(xs[w.shape[1]], w)
                times[name].append(time.perf_counter() - t0)
        base_ms, new_ms = (statistics.median(times[n]) * 1e3 for n in ("base", "new"))
        print(f"  rows {rows:>2}: base {base_ms:8.2f}   new {new_ms:8.2f}   new / base {new_ms / base_ms:.3f}")


if __name__ == "__main__":
    main()
