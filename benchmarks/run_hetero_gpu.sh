#!/usr/bin/env bash
# Heterogeneous placements on a GPU machine (a GPU and its host), results under $1 (default benchmarks/results):
# a GPU + CPU pipeline with an even and a measured layer split in both orders, `ferry plan --stages`'s predictions
# for them, and (with `offload` as $2) the layers a GPU budget cannot hold streamed over PCIe vs run as a CPU stage.
# The GPU tests (tests/test_gpu_hetero.py) need the default model installed.
#   bash benchmarks/run_hetero_gpu.sh [OUT] [offload]
set -uo pipefail
OUT=${1:-benchmarks/results}
. "$(dirname "$0")/gpu_session_env.sh"
DAY=$(date +%F)
echo "cpus: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
run timeout 420 python benchmarks/hetero_split.py gpu-cpu --shape llama3-8b --layers 16 --batches 1,16 --prompt-len 64 \
    --new-tokens 16 --repeats 2 --out "$OUT"
for b in 1 16; do
  run timeout 120 python -m ferry.cli plan --stages cuda:0,cpu --shape llama3-8b --batch "$b" --gpu-memory 12GiB \
      --json "$OUT/${DAY}_plan_stages_llama3-8b_b$b.json"
done
if [ "${2:-}" = offload ]; then
  run timeout 360 python benchmarks/hetero_split.py offload --shape llama3-8b --gpu-memory 12GiB --batches 1,16 \
      --prompt-len 64 --new-tokens 16 --repeats 2 --out "$OUT"
fi
