#!/usr/bin/env bash
# The GPU checks and measurements of one device session on a 2-GPU machine, in two parts (each fits one call):
#   bash benchmarks/run_gpu_truth.sh links OUT    # no model needed: own kernel + pooled copies tests, all-reduce
#                                                 # table, host link, decode paths of the Llama-3-8B shape
#   bash benchmarks/run_gpu_truth.sh model OUT    # needs the default model installed: every GPU test, TP=1 vs
#                                                 # TP=2 decode and prefill overlap, warm-cache compile time
# Logs and result files go to OUT (default benchmarks/results).
set -uo pipefail
PART=${1:?links or model}
OUT=${2:-benchmarks/results}
mkdir -p "$OUT"
. "$(dirname "$0")/gpu_session_env.sh"  # NVLink multicast off, compile cache, run()

if [ "$PART" = links ]; then
  run python -m pytest -q -m gpu tests/test_gpu_multi.py tests/test_gpu_link_and_graphs.py -k "allreduce_path or pooled" 2>&1 | tail -15
  run python -m ferry.cli bench allreduce --ranks 2 --out "$OUT" -v 2>&1 | tail -40
  CUDA_VISIBLE_DEVICES=0 run python -m ferry.cli bench host --device cuda --out "$OUT" 2>&1 | tail -45
  run python benchmarks/decode_paths.py --shape llama3-8b --paths autotune-cd,graph,compile --gpus 1,0 \
      --timeout 300 --out "$OUT" 2>&1 | tail -30
elif [ "$PART" = model ]; then
  run python -m pytest -q -m gpu tests/ 2>&1 | tail -25
  run python benchmarks/tp_decode.py --shape llama3-8b --tp 1,2 --out "$OUT" 2>&1 | tail -30
  run python benchmarks/decode_paths.py --shape llama3-8b --paths autotune-cd --gpus 0 --timeout 150 \
      --tag _warm_cache --out "$OUT" 2>&1 | tail -8
fi
