# Sourced by the run_*_gpu.sh scripts: the environment every device run needs, and `run`, which logs each
# command with its exit status and duration.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
export PYTHONUNBUFFERED=1 FERRY_STRICT_PATHS=1
# One compile cache for the whole session, so a later part measures a warm start.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ferry-inductor-cache}
run() { echo "== $*"; local t=$SECONDS; "$@"; local rc=$?; echo "== exit $rc after $((SECONDS - t)) s: $1 $2 $3"; }
