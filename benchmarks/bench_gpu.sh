#!/usr/bin/env bash
# Full-size PaliGemma 1 and 2 (3B, random weights at the real shapes) on one GPU, bf16: palitorch (compiled decode
# step with CUDA graphs) vs transformers' generate, batch 1 and 16, plus the card's measured copy bandwidth (the
# decode floor). Fits one 10-minute device call: everything ends within BUDGET_S (default 570) seconds of the start,
# and each size gets an equal share of what is left when it starts (the first at most half, so it cannot starve the
# second, which also gets whatever the first did not use):
#   bash benchmarks/bench_gpu.sh            # writes benchmarks/results/gpu-*.json (and copies to $OUT if set)
#   BUDGET_S=480 bash benchmarks/bench_gpu.sh   # a device call with less time left than 10 minutes (set it ~30 s under)
# By default (BENCH_ARGS="--decode-attention auto") each size first compiles the decode step with SDPA and with
# FlexAttention, times both at batch 1 and keeps the faster for the comparison (both timings go in the JSON).
#   BENCH_ARGS="--decode-attention flex" bash benchmarks/bench_gpu.sh     # one variant (see gpu_variants.sh)
#   BENCH_ARGS="--decode-attention auto --quantize int8" bash benchmarks/bench_gpu.sh   # int8 weights (unmeasured
#                                              # on a GPU so far; transformers then runs them dequantized)
#   GPU_TESTS=1 bash benchmarks/bench_gpu.sh   # first the CUDA-only tests (CUDA-graph decode and live batch vs
#                                              # CPU, early stop), ~1-2 min (150 s at most), then the benchmark in
#                                              # the time left
#   SIZE_LIMIT_S=200 bash benchmarks/bench_gpu.sh   # also at most this long for any one size
#   GPU_TESTS=1 SIZES= bash benchmarks/bench_gpu.sh              # the CUDA-only tests alone
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR" benchmarks/results
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
start=$SECONDS
if [ "${GPU_TESTS:-0}" = 1 ]; then
  PYTHONUNBUFFERED=1 timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/inference/test_steps.py \
    tests/inference/test_continuous.py -k "cuda or wait or done_watch" 2>&1 | tail -15 | tee "$OUTDIR/gpu-tests.log"
  echo "elapsed ${SECONDS}s after the tests"
fi
sizes=(${SIZES-pg1-3b pg2-3b})  # SIZES= (empty): the tests alone; a checkpoint folder's path works too
left=${#sizes[@]}
for size in ${sizes[@]+"${sizes[@]}"}; do  # (an empty array under set -u: bash before 4.4 calls it unbound)
  name=$(basename "$size")
  limit=$(( (${BUDGET_S:-570} - SECONDS) / left ))  # (SECONDS: since the script started, the tests included)
  left=$((left - 1))
  [ -n "${SIZE_LIMIT_S:-}" ] && [ "$SIZE_LIMIT_S" -lt "$limit" ] && limit=$SIZE_LIMIT_S
  if [ "$limit" -lt 1 ]; then echo "$size: skipped (no time left of BUDGET_S=${BUDGET_S:-570})"; continue; fi
  echo "$size: at most ${limit}s"
  # (an older record must not pass for this run's if it dies early; the JSON is written to $OUTDIR row by row, so
  # that a call cut short at its limit still brings back the rows finished)
  rm -f "benchmarks/results/gpu-$name.json" "$OUTDIR/gpu-$name.json"
  PYTHONUNBUFFERED=1 timeout "$limit" "$PY" benchmarks/bench_generate.py --sizes "$size" --device "${DEVICE:-cuda}" \
    --dtype bfloat16 --batches 1,16 --new-tokens 64 --reps 3 --compile-mode reduce-overhead ${BENCH_ARGS---decode-attention auto} \
    --json "$OUTDIR/gpu-$name.json" 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUTDIR/gpu-$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "$size: did not finish (exit $rc)"
  [ "$OUTDIR" = benchmarks/results ] || cp "$OUTDIR/gpu-$name.json" benchmarks/results/ 2>/dev/null || true
  echo "elapsed ${SECONDS}s after $size"
done
echo "total $((SECONDS - start)) s; the tables again:"
grep -h -E "^(size|  .* batch [0-9]+: |[^ ].*(first call|tokens differ))" "$OUTDIR"/gpu-*.log
