"""All-reduce + residual add + RMSNorm in one kernel: a one-shot all-reduce that needs no barrier ("Lamport").

After o_proj and after down_proj every tensor-parallel rank holds a partial sum; the unfused step is an all-reduce
(a copy into symmetric memory and a kernel, or NCCL), a residual add and an RMSNorm: four or more launches for a
few KiB at decode. Here one program per row:
  1. pushes its row of the partial sum into slot [rank] of every rank's buffer (NVLink stores to peers),
  2. reads the `world` slots of its own buffer, spinning until none holds the sentinel any more, and sums them in
     fp32 in rank order (every rank computes bit-identical results), rounded to the activations' dtype as the
     unfused all-reduce rounds,
  3. adds the residual (rounded), writes the new residual, and writes weight * rmsnorm(residual) (rmsnorm_row,
     as the unfused kernel computes it).

No barrier: the data is its own flag. Buffers start filled with the sentinel, -0.0 (a pushed -0.0 is sent as +0.0,
which sums to the same value), so a slot that no longer holds the sentinel has arrived. Each call uses one of three
buffer generations (call k: generation k mod 3) and clears generation k + 2 (what call k - 1 wrote in it) before
it ends; a peer writes that generation again only at call k + 2, which it cannot reach before this rank has
pushed call k + 1, which this rank does only after this kernel ended. The generation counter and each
generation's used length live in a small device-side state, so CUDA-graph replays advance them like eager calls.

Spins are bounded (a peer that never arrives sets the error word instead of hanging the GPU). References (facts,
not code): TensorRT-LLM's Lamport all-reduce fusion; FlashInfer's trtllm_allreduce_fusion.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ferry.model.layers.fused_kernels import rmsnorm_row, rounded

MAX_SPINS = tl.constexpr(1 << 26)  # ~ seconds of polling: far above any healthy wait, far below a hang
GENERATIONS = 3
# int64 state words: [0] the call counter; [1 + g] elements generation g's last call wrote per source slot; [4]
# programs of the current call that are done
STATE_WORDS = 5


SENTINEL = tl.constexpr(-32768)  # 0x8000 as int16: -0.0 in bf16 and fp16 (the kernel takes 16-bit activations)


@triton.jit
def lamport_allreduce_norm_kernel(partial_ptr, residual_ptr, w_ptr, out_ptr, buffer_ptrs, state_ptr, error_ptr,
                                  n_cols, slot_elems, eps, rank,
                                  world: tl.constexpr, BLOCK: tl.constexpr, HAS_NORM: tl.constexpr):
    row = tl.program_id(0)
    rows = tl.num_programs(0)
    call = tl.load(state_ptr)
    generation = call % 3
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offset = row.to(tl.int64) * n_cols + cols

    x = tl.load(partial_ptr + offset, mask=mask, other=0.0)
    bits = x.to(tl.int16, bitcast=True)
    x = tl.where(bits == SENTINEL, tl.zeros_like(bits), bits).to(x.dtype, bitcast=True)  # -0.0 -> +0.0
    gen_base = generation * world * slot_elems
    for peer in tl.static_range(world):
        base = tl.load(buffer_ptrs + peer).to(tl.pointer_type(x.dtype))
        tl.store(base + gen_base + rank * slot_elems + offset, x, mask=mask)

    own = tl.load(buffer_ptrs + rank).to(tl.pointer_type(x.dtype))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for source in tl.static_range(world):
        ptrs = own + gen_base + source * slot_elems + offset
        v = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
        spins = 0
        while (tl.sum((mask & (v.to(tl.int16, bitcast=True) == SENTINEL)).to(tl.int32), axis=0) > 0) \
                & (spins < MAX_SPINS):
            v = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
            spins += 1
        if spins >= MAX_SPINS:
            tl.atomic_xchg(error_ptr, 1)
        acc += v.to(tl.float32)
    total = rounded(acc, x.dtype)  # the all-reduce's result, rounded as the unfused one is

    r = tl.load(residual_ptr + offset, mask=mask, other=0.0)
    h32 = rounded(r.to(tl.float32) + total, x.dtype)
    tl.store(residual_ptr + offset, h32.to(x.dtype), mask=mask)
    if HAS_NORM:
        tl.store(out_ptr + offset, rmsnorm_row(h32, x.dtype, w_ptr, cols, mask, n_cols, eps), mask=mask)

    # Back to the sentinel: what the previous call wrote into generation (call + 2) % 3, every source's slot.
    clear = (call + 2) % 3
    used = tl.load(state_ptr + 1 + clear)
    clear_base = clear * world * slot_elems
    empty = tl.full([BLOCK], SENTINEL, tl.int16)
    own_bits = own.to(tl.pointer_type(tl.int16))
    start = row * BLOCK
    while start < used:
        span = start + cols
        for source in tl.static_range(world):
            tl.store(own_bits + clear_base + source * slot_elems + span, empty, mask=span < used)
        start += rows * BLOCK

    # The last program of this call to finish advances the counter and records this generation's length; every
    # program read the counter before it counted itself done, and the next call starts after this kernel ends.
    finished = tl.atomic_add(state_ptr + 4, 1)
    if finished == rows - 1:
        tl.store(state_ptr + 1 + generation, rows * n_cols)
        tl.store(state_ptr, call + 1)
        tl.store(state_ptr + 4, 0)
