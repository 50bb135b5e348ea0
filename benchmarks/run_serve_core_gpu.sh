#!/usr/bin/env bash
# The serving core's GPU checks and measurements (issue 13), in two parts that each fit one device call:
#   bash benchmarks/run_serve_core_gpu.sh kernels OUT   # paged-kernel, serving-engine and dense-cache GPU tests,
#                                                       # the decode-kernel table
#   bash benchmarks/run_serve_core_gpu.sh serve OUT     # `ferry bench serve-core`, Llama-3-8B shape, random bf16
#   bash benchmarks/run_serve_core_gpu.sh model OUT     # the default model installed: GPU tests on real weights
#                                                       # (TP=2 where two GPUs exist), compiled decode vs roofline
set -uo pipefail
PART=${1:?kernels or serve}
OUT=${2:-benchmarks/results}
mkdir -p "$OUT"
. "$(dirname "$0")/gpu_session_env.sh"  # NVLink multicast off, compile cache, run()

if [ "$PART" = kernels ]; then
  run python -m pytest -q -rA -m gpu tests/test_gpu_paged_attention.py tests/test_gpu_serving.py \
      tests/test_gpu_link_and_graphs.py > "$OUT/pytest_kernels.log" 2>&1
  grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/pytest_kernels.log" | head -40
  CUDA_VISIBLE_DEVICES=0 run timeout 200 python benchmarks/paged_attention_kernels.py --out "$OUT" 2>&1 | tail -30
  CUDA_VISIBLE_DEVICES=0 run timeout 120 python benchmarks/paged_attention_kernels.py --sweep --no-flex \
      --batches 1,64 --contexts 512,8192 --out "$OUT" 2>&1 | tail -40
elif [ "$PART" = serve ]; then
  CUDA_VISIBLE_DEVICES=0 run timeout 300 python -m ferry.cli bench serve-core --shape llama3-8b --device cuda \
      --requests 256 --concurrency 64 --prompt-lens 128:512 --output-lens 16:512 --kv-memory 0.5 \
      --parts continuous,batch1,prefix --out "$OUT" 2>&1 | tail -30
elif [ "$PART" = model ]; then  # needs the default model installed
  run python -m pytest -q -rA -m gpu tests/test_gpu.py tests/test_gpu_multi.py -k "not allreduce" \
      > "$OUT/pytest_model.log" 2>&1
  grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/pytest_model.log" | head -30
  CUDA_VISIBLE_DEVICES=0 run timeout 300 python -m ferry.cli bench serve-core --shape llama3-8b --device cuda \
      --concurrency 64 --prompt-lens 128:512 --output-lens 128:512 --kv-memory 0.5 --parts roofline --compile \
      --out "$OUT" 2>&1 | tail -12
fi
