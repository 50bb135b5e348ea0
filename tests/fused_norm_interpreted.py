"""Runs Ferry's all-reduce + add + RMSNorm kernel (ferry/comm/fused_norm_kernel.py) in Triton's CPU interpreter,
one process per simulated rank, over a sequence of calls of changing row counts (so every buffer generation is
used, cleared at one length and reused at another). Every rank maps every rank's buffer from a shared file, so,
as with symmetric memory on GPUs, each process writes into its peers' memory through pointers valid in its own
address space. Prints JSON.

    python tests/fused_norm_interpreted.py WORLD [ABSENT_RANK]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

COLS = 40  # below the block of 64: the masked tail runs
SLOT_ROWS = 4
CALLS = [(1, True), (3, True), (2, False), (1, True), (4, True), (2, True), (1, False), (3, True)]  # (rows, norm)
GENERATIONS = 3


def _mapped(folder: Path, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_file(str(folder / name), shared=True, size=numel, dtype=dtype)


def inputs(world: int, call: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Every rank's partial sum (with -0.0 entries), the residual and the norm weight of call `call`."""
    rows = CALLS[call][0]
    gen = torch.Generator().manual_seed(1000 * world + call)
    partials = [torch.randn(rows, COLS, generator=gen).to(torch.bfloat16) for _ in range(world)]
    for p in partials:
        p[:, ::5] = -0.0
    residual = torch.randn(rows, COLS, generator=gen).to(torch.bfloat16)
    weight = (torch.rand(COLS, generator=gen) + 0.5).to(torch.bfloat16)
    return partials, residual, weight


def child(folder: Path, world: int, rank: int, spins: int) -> None:
    import triton.language as tl

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from interpreter_bf16 import round_bf16_as_on_gpus

    from ferry.comm import fused_norm_kernel

    round_bf16_as_on_gpus()
    # The interpreter polls slowly: enough polls to cover a peer process that starts late on a busy machine, few
    # where a peer is missing by design, so that run ends soon.
    fused_norm_kernel.MAX_SPINS = tl.constexpr(spins)
    slot_elems = SLOT_ROWS * COLS
    buffers = [_mapped(folder, f"buf{r}", GENERATIONS * world * slot_elems, torch.int16) for r in range(world)]
    buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    state = torch.zeros(fused_norm_kernel.STATE_WORDS, dtype=torch.int64)
    error = torch.zeros(1, dtype=torch.int32)
    results = []
    for call, (rows, with_norm) in enumerate(CALLS):
        partials, residual, weight = inputs(world, call)
        out = torch.zeros(rows, COLS, dtype=torch.bfloat16)
        fused_norm_kernel.lamport_allreduce_norm_kernel[(rows,)](
            partials[rank], residual, weight, out, buffer_ptrs, state, error, COLS, slot_elems, 1e-5, rank,
            world=world, BLOCK=64, HAS_NORM=with_norm)
        results.append((residual, out if with_norm else None))
        if int(error):
            break
    torch.save({"results": results, "error": int(error), "state": state.tolist()}, folder / f"out{rank}.pt")


def main(world: int, absent: int) -> dict:
    from ferry.model.layers.fused import rmsnorm_reference

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for r in range(world):
            _mapped(folder, f"buf{r}", GENERATIONS * world * SLOT_ROWS * COLS, torch.int16).fill_(-32768)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        spins = 300 if absent >= 0 else 20_000
        procs = [subprocess.Popen([sys.executable, __file__, "--child", tmp, str(world), str(r), str(spins)], env=env)
                 for r in range(world) if r != absent]
        codes = [p.wait(timeout=300) for p in procs]
        present = [r for r in range(world) if r != absent]
        outs = {r: torch.load(folder / f"out{r}.pt") for r in present if (folder / f"out{r}.pt").exists()}
        residual_exact, norm_diff = True, 0.0
        for call, (_rows, with_norm) in enumerate(CALLS):
            partials, residual, weight = inputs(world, call)
            expected_residual = residual + torch.stack([p.float() for p in partials]).sum(0).to(torch.bfloat16)
            expected = rmsnorm_reference(expected_residual, weight, 1e-5)
            for r, out in outs.items():
                if call >= len(out["results"]):
                    continue
                got_residual, got = out["results"][call]
                residual_exact &= torch.equal(got_residual, expected_residual)
                if with_norm:
                    norm_diff = max(norm_diff, float((got.float() - expected.float()).abs().max()))
        buffers_clean = [
            int((_mapped(folder, f"buf{r}", GENERATIONS * world * SLOT_ROWS * COLS, torch.int16) != -32768).sum())
            for r in range(world)]
        return {
            "exit_codes": codes,
            "errors": [outs[r]["error"] for r in present if r in outs],
            "calls": [outs[r]["state"][0] for r in present if r in outs],
            "residual_exact": residual_exact,
            "norm_max_diff": norm_diff,
            # after the last call only its own generation and the one before it still hold data
            "words_not_sentinel": buffers_clean,
            "same_on_every_rank": all(
                all(torch.equal(a[0], b[0]) for a, b in zip(outs[present[0]]["results"], outs[r]["results"],
                                                             strict=True)) for r in outs),
        }


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else -1)))
