#!/usr/bin/env bash
# `ferry serve` on a GPU (issue 15), in two parts that each fit one device call:
#   bash benchmarks/run_serve_gpu.sh bench OUT    # Llama-3-8B shape, random bf16: TPOT through HTTP vs the engine
#                                                 # driven directly at 64 streams (a warm-up pair, then up to 8
#                                                 # counted pairs within the time budget; TAG names the files),
#                                                 # after the link-timing GPU test; SWEEP=1: then an open-loop
#                                                 # rate sweep against the same server
#   bash benchmarks/run_serve_gpu.sh tp2 OUT      # two GPUs: `ferry serve --tp 2` (8B shape) under 64 streams
#   bash benchmarks/run_serve_gpu.sh verify OUT   # the default model installed: serve + batched-cloud GPU tests
#                                                 # (--tp 2 where two GPUs exist), the serving engine's GPU tests
set -uo pipefail
PART=${1:?bench or verify}
OUT=${2:-benchmarks/results}
mkdir -p "$OUT"
. "$(dirname "$0")/gpu_session_env.sh"  # NVLink multicast off, compile cache, run()

if [ "$PART" = bench ]; then
  CUDA_VISIBLE_DEVICES=0 run timeout 90 python -m pytest -q -rA -m gpu tests/test_link_metrics.py 2>&1 | tail -4
  CUDA_VISIBLE_DEVICES=0 run timeout 520 python -m ferry.cli bench serve-overhead --shape llama3-8b --device cuda \
      --kv-memory 16GiB --concurrency 64 --requests 192 --rounds 8 --warmup-rounds 1 --time-budget-s 400 \
      --prompt-tokens 128-512 --output-tokens 128-512 ${TAG:+--tag "$TAG"} \
      ${SWEEP:+--rates 8,16,32,64,128,inf --sweep-requests 384} --out "$OUT" 2>&1 | tail -60
elif [ "$PART" = tp2 ]; then
  python -m ferry.cli serve --tp 2 --shape llama3-8b --device cuda --kv-memory 16GiB --port 8011 \
      2> "$OUT/serve_tp2.log" &
  for _ in $(seq 300); do grep -q "serving llama3-8b on" "$OUT/serve_tp2.log" && break; sleep 1; done
  run timeout 300 python -m ferry.cli bench serve --url http://127.0.0.1:8011 --concurrency 64 --requests 128 \
      --prompt-tokens 128-512 --output-tokens 128-512 --tag llama3-8b_cuda_tp2 --server-device "2x H200, --tp 2" \
      --out "$OUT" 2>&1 | tail -8
  curl -s http://127.0.0.1:8011/metrics | grep -E "^ferry_link_|^ferry_engine_(graph_)?steps_total"
  kill -TERM %1; wait %1; echo "server exit $?"; tail -3 "$OUT/serve_tp2.log"
elif [ "$PART" = verify ]; then  # needs the default model installed
  run python -m pytest -q -rA -m gpu tests/test_gpu_serve_and_cloud.py tests/test_gpu_serving.py \
      > "$OUT/pytest_serve.log" 2>&1
  grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/pytest_serve.log" | head -30
fi
