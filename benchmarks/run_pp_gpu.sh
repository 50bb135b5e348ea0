#!/usr/bin/env bash
# Pipeline-parallel GPU checks and measurements in one go (one device session, 2+ GPUs), results under $1
# (default benchmarks/results).
#   bash benchmarks/run_pp_gpu.sh [OUT]
set -uo pipefail
OUT=${1:-benchmarks/results}
. "$(dirname "$0")/gpu_session_env.sh"
run python -m pytest -q -m gpu tests/test_gpu_pipeline.py
run python benchmarks/pp_decode.py --device cuda --shape llama3-8b --layouts 1x1,2x1,1x2 --batches 1,16,64 --socket \
    --out "$OUT"
