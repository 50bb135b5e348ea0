"""Ferry's own one-shot all-reduce: one Triton kernel over symmetric-memory buffers (NVLink peer loads).

Every rank has copied its input into its symmetric buffer. Block b of every rank then
  1. meets block b of every peer at a barrier in the signal pads (so every peer's input has landed),
  2. reads its chunk from all `world` buffers directly over NVLink, sums them in fp32 in rank order (so every
     rank computes bit-identical results) and writes its own output,
  3. meets the same blocks again, so no rank reuses its buffer while a peer may still read it.
One launch, no NCCL proxy, no ring steps: for the small messages of decode this is latency-bound, and launch +
two barriers is the whole cost. Torch's one_shot_all_reduce does the same work; this kernel exists to be tuned
(block count, vector width) for Ferry's sizes and is only chosen where calibration measures it faster.

Barrier protocol per slot [block, peer] of a signal pad (uint32): the sender CASes 0 -> 1 on the receiver's pad
(release, system scope), the receiver CASes 1 -> 0 on its own (acquire, system scope), so slots return to 0 and
calls can follow each other without resets. Spins are bounded: a peer that never arrives leaves the error word
set instead of hanging the GPU forever, and the caller raises.
"""

from __future__ import annotations

import triton
import triton.language as tl

# A constexpr, not a plain int: compiled Triton refuses non-constexpr globals (the interpreter accepts them, which is
# how an earlier version passed the CPU test and failed to compile on the GPU).
MAX_SPINS = tl.constexpr(1 << 26)  # ~ seconds of spinning: far above any healthy wait, far below a hang


@triton.jit
def _swap_when(slot, expected, new, error_ptr, SEM: tl.constexpr):
    """Spin until `slot` holds `expected`, then store `new` (one system-scope CAS); bounded."""
    spins = 0
    while (tl.atomic_cas(slot, expected, new, sem=SEM, scope="sys") != expected) & (spins < MAX_SPINS):
        spins += 1
    if spins >= MAX_SPINS:
        tl.atomic_xchg(error_ptr, 1)


@triton.jit
def _barrier(signal_pads, error_ptr, block, rank, world: tl.constexpr):
    """Block `block` of every rank meets here: announce on each peer's pad, then collect each peer's notice."""
    for peer in tl.static_range(world):
        pad = tl.load(signal_pads + peer).to(tl.pointer_type(tl.uint32))
        _swap_when(pad + block * world + rank, 0, 1, error_ptr, "release")
    own = tl.load(signal_pads + rank).to(tl.pointer_type(tl.uint32))
    for peer in tl.static_range(world):
        _swap_when(own + block * world + peer, 1, 0, error_ptr, "acquire")


@triton.jit
def one_shot_all_reduce_kernel(buffer_ptrs, signal_pads, error_ptr, out_ptr, numel, rank,
                               world: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    blocks = tl.num_programs(0)
    _barrier(signal_pads, error_ptr, block, rank, world)  # every peer's input has landed
    tl.debug_barrier()  # one thread took the acquire: the block's other threads read peers only after it
    start = block * BLOCK
    while start < numel:
        # Hints: chunks start on BLOCK boundaries and peer buffers are 16-byte aligned (symmetric allocations), so
        # loads and stores become 16-byte vectors instead of one 2-byte access per element.
        offsets = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        mask = offsets < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(world):
            base = tl.multiple_of(tl.load(buffer_ptrs + peer).to(tl.pointer_type(out_ptr.dtype.element_ty)), 16)
            acc += tl.load(base + offsets, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
        start += blocks * BLOCK
    tl.debug_barrier()  # every thread of the block is done reading peers before one thread releases them
    _barrier(signal_pads, error_ptr, block, rank, world)  # every peer has read this block's chunk of ours
