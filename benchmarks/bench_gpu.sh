#!/usr/bin/env bash
# Full-size PaliGemma 1 and 2 (3B, random weights at the real shapes) on one GPU, bf16: palitorch (compiled decode
# step with CUDA graphs) vs transformers' generate, batch 1 and 16. Fits one 10-minute device call:
#   bash benchmarks/bench_gpu.sh            # writes benchmarks/results/gpu-*.json and prints the tables
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for size in pg1-3b pg2-3b; do
  PYTHONUNBUFFERED=1 timeout 280 "$PY" benchmarks/bench_generate.py --sizes "$size" --device cuda --dtype bfloat16 \
    --batches 1,16 --new-tokens 64 --reps 3 --compile --compile-mode reduce-overhead \
    --json "benchmarks/results/gpu-$size.json" || echo "$size: did not finish"
done
