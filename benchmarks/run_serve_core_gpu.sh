#!/usr/bin/env bash
# The serving core's GPU checks and measurements (issue 13), in two parts that each fit one device call:
#   bash benchmarks/run_serve_core_gpu.sh kernels OUT   # no model file: paged-kernel and serving-engine GPU tests,
#                                                       # the dense-cache graph tests, the decode-kernel table
#   bash benchmarks/run_serve_core_gpu.sh serve OUT     # the default model installed: GPU tests on real weights
#                                                       # (TP=2 too where two GPUs exist), then `ferry bench
#                                                       # serve-core` on the Llama-3-8B shape
set -uo pipefail
PART=${1:?kernels or serve}
OUT=${2:-benchmarks/results}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
export PYTHONUNBUFFERED=1 FERRY_STRICT_PATHS=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ferry-inductor-cache}
run() { echo "== $*"; local t=$SECONDS; "$@"; local rc=$?; echo "== exit $rc after $((SECONDS - t)) s: $1 $2 $3"; }

if [ "$PART" = kernels ]; then
  run python -m pytest -q -rA -m gpu tests/test_gpu_paged_attention.py tests/test_gpu_serving.py \
      tests/test_gpu_link_and_graphs.py > "$OUT/pytest_kernels.log" 2>&1
  grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error|error:" "$OUT/pytest_kernels.log" | head -40
  CUDA_VISIBLE_DEVICES=0 run timeout 200 python benchmarks/paged_attention_kernels.py --out "$OUT" 2>&1 | tail -30
  CUDA_VISIBLE_DEVICES=0 run timeout 120 python benchmarks/paged_attention_kernels.py --sweep --no-flex \
      --batches 1,64 --contexts 512,8192 --out "$OUT" 2>&1 | tail -40
elif [ "$PART" = serve ]; then
  run python -m pytest -q -rA -m gpu tests/test_gpu.py tests/test_gpu_multi.py -k "not allreduce" \
      > "$OUT/pytest_serve.log" 2>&1
  grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error|error:" "$OUT/pytest_serve.log" | head -30
  CUDA_VISIBLE_DEVICES=0 run timeout 330 python -m ferry.cli bench serve-core --shape llama3-8b --device cuda \
      --requests 256 --concurrency 64 --prompt-lens 128:512 --output-lens 16:512 --kv-memory 0.5 --out "$OUT" \
      2>&1 | tail -40
fi
