#!/usr/bin/env bash
# Pipeline-parallel GPU checks and measurements in one go (one device session, 2+ GPUs), results under $1
# (default benchmarks/results): the GPU tests, one device vs TP vs PP over NVLink and sockets, this machine's
# topology, the planner's calibrated predictions for the same workloads, and how well they matched.
#   bash benchmarks/run_pp_gpu.sh [OUT]
set -uo pipefail
OUT=${1:-benchmarks/results}
. "$(dirname "$0")/gpu_session_env.sh"
DAY=$(date +%F)
run python -m pytest -q -m gpu tests/test_gpu_pipeline.py
run python benchmarks/pp_decode.py --device cuda --shape llama3-8b --layouts 1x1,2x1,1x2 --batches 1,16,64 --socket \
    --out "$OUT"
run python -m ferry.cli topo --device cuda --json "$OUT/${DAY}_topo_h200x2.json"
PLANS=()
PLAN_DIR=$(mktemp -d)  # the plans are inputs of the comparison, not results
for b in 1 16 64; do
  run python -m ferry.cli plan --topology "$OUT/${DAY}_topo_h200x2.json" --calibrate --device cuda --shape llama3-8b \
      --batch "$b" --prompt 128 --output 128 --json "$PLAN_DIR/plan_b$b.json"
  PLANS+=("$PLAN_DIR/plan_b$b.json")
done
run python benchmarks/plan_vs_measured.py --measured "$OUT/${DAY}_pp_decode_llama3-8b_cuda.json" --plans "${PLANS[@]}" \
    --stem "${DAY}_plan_vs_measured_llama3-8b_cuda" --plan-commit "${FERRY_GIT_COMMIT:-$(git rev-parse --short HEAD)}" \
    --out "$OUT"
