"""Runs Ferry's one-shot all-reduce kernel in Triton's CPU interpreter, one process per simulated rank. Every
rank maps every rank's buffer and signal pad from shared files, so, as with symmetric memory on GPUs, each
process reads its peers' memory through pointers valid in its own address space. Prints JSON.

    python tests/one_shot_interpreted.py WORLD NUMEL BLOCKS [ABSENT_RANK]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _mapped(folder: Path, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_file(str(folder / name), shared=True, size=numel, dtype=dtype)


def child(folder: Path, world: int, numel: int, blocks: int, rank: int) -> None:
    import triton.language as tl

    from ferry.comm import one_shot_kernel

    one_shot_kernel.MAX_SPINS = tl.constexpr(5_000)  # the interpreter spins slowly; a missing peer must end the run quickly
    buffers = [_mapped(folder, f"buf{r}", numel, torch.bfloat16) for r in range(world)]
    pads = [_mapped(folder, f"pad{r}", blocks * world, torch.int32) for r in range(world)]
    out, error = _mapped(folder, f"out{rank}", numel, torch.bfloat16), _mapped(folder, f"err{rank}", 1, torch.int32)
    buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)
    one_shot_kernel.one_shot_all_reduce_kernel[(blocks,)](buffer_ptrs, pad_ptrs, error, out, numel, rank,
                                                          world=world, BLOCK=256)


def main(world: int, numel: int, blocks: int, absent: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        gen = torch.Generator().manual_seed(world * 1000 + numel)
        inputs = [torch.randn(numel, generator=gen).to(torch.bfloat16) for _ in range(world)]
        for r in range(world):
            _mapped(folder, f"buf{r}", numel, torch.bfloat16).copy_(inputs[r])
            _mapped(folder, f"pad{r}", blocks * world, torch.int32).zero_()
            _mapped(folder, f"out{r}", numel, torch.bfloat16).zero_()
            _mapped(folder, f"err{r}", 1, torch.int32).zero_()
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, "--child", tmp, str(world), str(numel), str(blocks),
                                   str(r)], env=env) for r in range(world) if r != absent]
        codes = [p.wait(timeout=300) for p in procs]
        outs = [_mapped(folder, f"out{r}", numel, torch.bfloat16).clone() for r in range(world)]
        expected = torch.stack([x.float() for x in inputs]).sum(0)  # fp32 sum, like the kernel's accumulator
        present = [r for r in range(world) if r != absent]
        return {
            "exit_codes": codes,
            "errors": [int(_mapped(folder, f"err{r}", 1, torch.int32)) for r in present],
            # within one bf16 rounding of the fp32 sum (the interpreter's fp32 -> bf16 cast may truncate)
            "max_rel_error": max(float(((outs[r].float() - expected).abs() / expected.abs().clamp_min(1e-3)).max())
                                 for r in present),
            "same_on_every_rank": all(torch.equal(outs[r], outs[present[0]]) for r in present),
            "pads_clear": all(int(_mapped(folder, f"pad{r}", blocks * world, torch.int32).abs().sum()) == 0
                              for r in range(world)),
        }


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(Path(sys.argv[2]), *(int(a) for a in sys.argv[3:7]))
    else:
        args = [int(a) for a in sys.argv[1:]]
        print(json.dumps(main(*args[:3], args[3] if len(args) > 3 else -1)))
