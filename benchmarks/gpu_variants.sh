#!/usr/bin/env bash
# Variants of the compiled decode step, side by side on one GPU, batch 1, full-size PaliGemma 1 and 2 (3B, random
# weights, bf16): to choose `pipe.compile()`'s defaults from measurements. Fits one 10-minute device call.
#   bash benchmarks/gpu_variants.sh        # prints ms per step per variant; logs to $OUT (or benchmarks/results)
# Variants (see benchmarks/profile_decode.py): fused = today's default; cdt = inductor's coordinate-descent tuning;
# mm-attn = one-token attention as two matmuls instead of SDPA (PaliGemma 2 always uses matmuls); flex-attn = one
# FlexAttention kernel with the mask and soft-cap as a score modification; autotune = mode "max-autotune" (last:
# its first call is long, and the size's time limit may cut it off).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$SECONDS
run() {  # size variants
  PYTHONUNBUFFERED=1 timeout "${SIZE_LIMIT_S:-280}" "$PY" benchmarks/profile_decode.py --size "$1" --device cuda \
    --dtype bfloat16 --new-tokens 64 --reps 3 --variants "$2" --profile none 2>&1 \
    | grep --line-buffered -v "Loading weights" | tee "$OUTDIR/gpu-variants-$1.log"
  echo "elapsed ${SECONDS}s after $1"
}
run pg1-3b "${PG1_VARIANTS:-fused,fused+flex-attn,fused+mm-attn,fused+cdt,fused+autotune}"
run pg2-3b "${PG2_VARIANTS:-fused,fused+flex-attn,fused+cdt}"
echo "total $((SECONDS - start)) s"
grep -h "ms per decode step" "$OUTDIR"/gpu-variants-*.log
