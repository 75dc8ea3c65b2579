"""Where a decode step's time goes: palitorch's compiled decode, per-step wall time vs device kernel time, and the
kernels that take it. Also times variants of the compiled step side by side, to choose defaults on a new machine.

    python benchmarks/profile_decode.py --size pg1-3b --device cuda --dtype bfloat16
    python benchmarks/profile_decode.py --size pg1-3b --device cuda --dtype bfloat16 \
        --variants fused,fused+cdt,fused+mm-attn,fused+cdt+mm-attn --profile none
    python benchmarks/profile_decode.py --size pg1-mini --dtype bfloat16      # a rehearsal on CPU

A variant is `+`-joined parts: `fused` (what `pipe.compile()` does: q/k/v and gate/up in one matrix each) or
`unfused` (the same compile without fusing), `cdt` (inductor's coordinate-descent tuning of its generated kernels),
`sdpa-attn` / `mm-attn` (one-token attention through SDPA / as two matmuls and a softmax; without either, palitorch's
default: SDPA, or matmuls on CPUs without AMX; Gemma 2 always uses matmuls),
`flex-attn` (one-token attention as one FlexAttention kernel, the mask and Gemma 2's soft-cap as a score
modification), `autotune` (mode "max-autotune": inductor times candidate matmul kernels; CUDA graphs too; a long
first call).
Random weights as in bench_generate.py (same folder cache). Prints ms per decode step for each variant (median of
--reps, from runs of 1 and N new tokens; every variant must give the first variant's tokens, up to a near-tie in
16-bit dtypes), then a profile of one N-token run of the --profile variant: device busy time per step and the top
kernels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inputs import PROMPT, SIZES, check_size, checkpoint  # noqa: E402
from measure import default_tie_tol, ms_per_step, same_answer, sync  # noqa: E402

import palitorch  # noqa: E402


def profile(pipe, image, n: int, batch: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pipe.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        pipe.generate([image] * batch, [PROMPT] * batch, max_new_tokens=n, min_new_tokens=n)
        sync(pipe.device)
    kernels = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name][0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            kernels[e.name][1] += 1
    if not kernels:
        print("  (no device kernels: CPU run; the profile is for GPUs)")
        return
    total = sum(v[0] for v in kernels.values())
    launches = sum(v[1] for v in kernels.values())
    print(f"  device kernel time {total / 1e3:.1f} ms for prefill + {n - 1} steps; {launches} kernels")
    for name, (us, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {us / 1e3:8.2f} ms {count:6d}x {us / max(count, 1):8.1f} us  {name[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--size", default="pg1-mini",
                    help=f"one of {', '.join(SIZES)}, or a checkpoint folder (default pg1-mini)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--mode", default="reduce-overhead")
    ap.add_argument("--variants", default="unfused,fused")
    ap.add_argument("--profile", default="fused", help="the variant to profile, or none")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "palitorch-bench"))
    args = ap.parse_args()
    if error := check_size(args.size):
        ap.error(error)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    folder, _ = checkpoint(args.size, workdir, args.device, dtype)
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    first_tokens = None
    for variant in args.variants.split(","):
        parts = set(variant.split("+"))
        if unknown := parts - {"fused", "unfused", "cdt", "mm-attn", "flex-attn", "autotune"}:
            raise SystemExit(f"unknown variant part(s) {sorted(unknown)}: "
                             "use fused, unfused, cdt, mm-attn, flex-attn, autotune")
        try:  # one failing variant (a kernel that does not fit this card) must not cost the others' figures
            first_tokens = run_variant(variant, parts, folder, dtype, image, first_tokens, args)
        except Exception as e:  # noqa: BLE001 - report and go on
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            print(f"{args.size} batch {args.batch} {variant}: FAILED: {type(e).__name__}: {msg}", flush=True)
        torch._dynamo.reset()


def run_variant(variant: str, parts: set[str], folder, dtype, image, first_tokens, args):
    """Time one variant (and profile it if asked); returns the reference answer (the first variant's)."""
    mode = "max-autotune" if "autotune" in parts else args.mode
    pipe = palitorch.load(folder, device=args.device, dtype=dtype)
    pipe.feature_cache.resize(0)  # every repetition runs the vision tower, as transformers' do
    for part, kind in (("sdpa-attn", "sdpa"), ("mm-attn", "matmul"), ("flex-attn", "flex")):
        if part in parts:
            pipe.model.language_model.set_decode_attention(kind)
    options = {"coordinate_descent_tuning": True} if "cdt" in parts else None
    pipe.compile(mode=mode, options=options, fuse="unfused" not in parts)
    t0 = time.perf_counter()
    answer = pipe.generate(image, PROMPT, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    sync(pipe.device)
    first = time.perf_counter() - t0
    first_tokens = first_tokens or answer
    if answer.token_ids == first_tokens.token_ids:
        same = "same tokens"
    elif same_answer(answer, first_tokens, default_tie_tol(dtype)):
        same = "same tokens up to a near-tie (16-bit rounding)"
    else:
        same = "TOKENS DIFFER from the first variant"
    if len(set(answer.token_ids)) <= 1:  # as bench_generate's check: agreeing on an echo shows little
        same += " (WARNING: the answer repeats one token, so this agreement shows little)"
    ms = ms_per_step(pipe, [image] * args.batch, [PROMPT] * args.batch, args.new_tokens, args.reps)
    print(f"{args.size} batch {args.batch} {variant}: {ms:.3f} ms per decode step "
          f"({args.batch / ms * 1e3:.0f} tok/s); first call {first:.1f} s; {same}", flush=True)
    if variant == args.profile:
        profile(pipe, image, args.new_tokens, args.batch, args.top)
    return first_tokens


if __name__ == "__main__":
    main()
