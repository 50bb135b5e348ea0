#!/usr/bin/env bash
# Tensor-parallel decode with the fused kernels on a 2-GPU machine, results under $1 (default benchmarks/results).
# $2 picks the part: bench (the fused all-reduce + add + RMSNorm vs the unfused ways at both models' widths, and the
# Llama-3-8B decode with every variant side by side), tests (the GPU tests of the kernels and of TP, which need the
# default model installed), 70b (Llama-3-70B's shape on two GPUs).
#   bash benchmarks/run_fused_gpu.sh [OUT] bench|tests|70b
set -uo pipefail
OUT=${1:-benchmarks/results}
. "$(dirname "$0")/gpu_session_env.sh"
case "${2:-bench}" in
  bench)
    run timeout 150 python benchmarks/fused_allreduce_norm.py --ranks 2 --width 4096 --out "$OUT"
    run timeout 150 python benchmarks/fused_allreduce_norm.py --ranks 2 --width 8192 --out "$OUT"
    run timeout 400 python benchmarks/tp_decode.py --shape llama3-8b --tp 1,2 --batches 1,16 --prefill 0x0 \
        --variants fused,fused-ar-unfused,torch --stem-suffix _fused --out "$OUT"
    ;;
  tests)
    run timeout 560 python -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gpu_fused.py tests/test_gpu_multi.py \
        tests/test_gpu.py tests/test_gpu_paged_attention.py tests/test_gpu_hetero.py
    ;;
  70b)
    run timeout 560 python benchmarks/tp_decode.py --shape llama3-70b --tp 2 --batches 1,16 --prefill 0x0 \
        --variants fused,torch --new-tokens 64 --out "$OUT"
    ;;
esac
