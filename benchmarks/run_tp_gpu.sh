#!/usr/bin/env bash
# Every tensor-parallel GPU measurement and check in one go (one device session), results under $1 (default
# benchmarks/results). Uses as many GPUs as are visible: the 2-rank parts on 2+, the 4-rank parts on 4+.
#   bash benchmarks/run_tp_gpu.sh [OUT]
set -uo pipefail
OUT=${1:-benchmarks/results}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
echo "visible GPUs: $GPUS"
run() { echo "== $*"; "$@" || echo "!! failed ($?): $*"; }

run python -m pytest -q -m gpu tests/test_gpu_multi.py tests/test_gpu.py
for world in 2 4; do
  [ "$GPUS" -ge "$world" ] || continue
  run python -c "from ferry.bench.allreduce import run_allreduce_bench as r; print(r('cuda', $world, 64, 'bfloat16', '$OUT'))"
done
if [ "$GPUS" -ge 4 ]; then
  run python benchmarks/tp_decode.py --shape llama3-8b --tp 1,2,4 --out "$OUT"
  run python benchmarks/tp_decode.py --shape llama3-70b --tp 4 --prefill 0x0 --out "$OUT"
  run torchrun --nproc-per-node 4 benchmarks/hf_tp_decode.py --shape llama3-8b --out "$OUT"
elif [ "$GPUS" -ge 2 ]; then
  run python benchmarks/tp_decode.py --shape llama3-8b --tp 1,2 --out "$OUT"
  run torchrun --nproc-per-node 2 benchmarks/hf_tp_decode.py --shape llama3-8b --out "$OUT"
fi
