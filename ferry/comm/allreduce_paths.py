"""The ways Ferry can sum a tensor over a tensor-parallel group, each behind one `reduce(tensor) -> tensor` call.

- `process_group`: torch.distributed.all_reduce on the group's backend (NCCL on GPUs, gloo on CPU).
- `symm_one_shot` / `symm_two_shot`: torch symmetric memory (CUDA, NVLink peers; multicast stays off). The
  input is copied into a buffer every rank allocated symmetrically, then each rank reads its peers' buffers
  directly: one-shot reads all of them (fewest steps, best for small messages), two-shot reduce-scatters then
  all-gathers (half the traffic per rank, better as messages grow). Both are capturable in CUDA graphs.
- `ferry_one_shot`: Ferry's own Triton one-shot kernel over its own symmetric buffer (one_shot_kernel.py).
  It checks itself when created (a known sum, a bounded barrier) and is offered only if that passes.

A path that cannot run here says why (`unavailable_reason`) instead of failing later or falling back silently.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from ferry.comm.host_shm import HostSharedMemoryPath
from ferry.device import triton_import_error

log = logging.getLogger("ferry.allreduce")

# What "this machine cannot run the path" looks like: torch raises RuntimeError (or OSError) when the driver, the
# topology or a rendezvous refuses, and a failed self-test raises PathUnavailable. Anything else (a NameError, a
# TypeError, Triton's CompilationError) is a bug in the path: logged as one too, and raised where
# FERRY_STRICT_PATHS=1 (the test suite sets it) so it fails a test instead of hiding behind "not available".
MACHINE_CANNOT = (RuntimeError, OSError)
# CPU ranks' shared-memory slots: a message up to this size (a prefill chunk of ~1800 SmolLM2 tokens in fp32) takes
# host shared memory; larger ones gloo. Each rank maps 2 x ranks slots of it.
HOST_SHM_BYTES = 8 << 20


class PathUnavailable(RuntimeError):
    """A path that was built but proved it cannot run here (its self-test failed)."""


def error_chain(exc: BaseException) -> str:
    """The whole error, causes included: a compiler's first line alone names only the outermost call site."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {str(exc).strip()}")
        exc = exc.__cause__ or exc.__context__
    return "\n  caused by ".join(parts)


class ProcessGroupPath:
    name = "process_group"

    def __init__(self, process_group: dist.ProcessGroup | None) -> None:
        self.process_group = process_group
        self.label = f"{dist.get_backend(process_group)}" if dist.is_initialized() else "process_group"

    def fits(self, tensor: torch.Tensor) -> bool:
        return True

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.process_group)
        return tensor


class _SymmetricBuffer:
    """One buffer of `max_bytes` per rank, allocated symmetrically and rendezvoused over the group; messages
    always start at its first byte, so every message is a prefix of the rendezvoused tensor."""

    def __init__(self, process_group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.max_bytes = max_bytes
        self.group_name = process_group.group_name
        symm_mem.enable_symm_mem_for_group(self.group_name)  # a no-op where the torch build does it already
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)

    @staticmethod
    def unavailable_reason(process_group: dist.ProcessGroup | None, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "symmetric memory needs CUDA devices"
        if process_group is None or dist.get_backend(process_group) != "nccl":
            return "symmetric memory needs an NCCL group"
        try:
            import torch.distributed._symmetric_memory  # noqa: F401
        except ImportError as exc:
            return f"torch symmetric memory is not importable ({exc})"
        if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem, "two_shot_all_reduce_"):
            return "this torch build has no symm_mem all-reduce ops"
        return None

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() * tensor.element_size() <= self.max_bytes and tensor.dtype == self.buffer.dtype


class SymmetricMemoryPath(_SymmetricBuffer):
    """Torch's one-shot or two-shot all-reduce through the symmetric buffer."""

    def __init__(self, kind: str, process_group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int) -> None:
        assert kind in ("one_shot", "two_shot")
        super().__init__(process_group, device, dtype, max_bytes)
        self.name = f"symm_{kind}"
        self.label = f"symm-mem {kind.replace('_', '-')}"
        self.kind = kind

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.reshape(-1)
        staged = self.buffer[: flat.numel()]
        staged.copy_(flat)
        if self.kind == "one_shot":
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        else:
            torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
            flat.copy_(staged)
        return flat.view(tensor.shape)


class FerryOneShotPath(_SymmetricBuffer):
    """Ferry's Triton one-shot kernel (ferry/comm/one_shot_kernel.py) over the symmetric buffer."""

    name = "ferry_one_shot"
    label = "ferry one-shot (Triton)"
    BLOCK = 2048

    def __init__(self, process_group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        super().__init__(process_group, device, dtype, max_bytes)
        self.rank, self.world = self.handle.rank, self.handle.world_size
        self.buffer_ptrs = torch.tensor(self.handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.signal_pads = torch.tensor(self.handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        # Slots [block, peer] of uint32 must fit the signal pad: that bounds the grid.
        self.max_blocks = max(1, min(64, symm_mem.get_signal_pad_size() // 4 // self.world))
        self.error = torch.zeros(1, dtype=torch.int32, device=device)
        self._self_test(dtype, device)

    @staticmethod
    def unavailable_reason(process_group, device: torch.device) -> str | None:
        if (reason := _SymmetricBuffer.unavailable_reason(process_group, device)) is not None:
            return reason
        return "Triton is not installed" if triton_import_error() is not None else None

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        from ferry.comm.one_shot_kernel import one_shot_all_reduce_kernel

        flat = tensor.reshape(-1)
        numel = flat.numel()
        self.buffer[:numel].copy_(flat)
        grid = (min(self.max_blocks, -(-numel // self.BLOCK)),)
        one_shot_all_reduce_kernel[grid](self.buffer_ptrs, self.signal_pads, self.error, flat, numel, self.rank,
                                         world=self.world, BLOCK=self.BLOCK, num_warps=8)
        return flat.view(tensor.shape)

    def _self_test(self, dtype: torch.dtype, device: torch.device) -> None:
        """A known sum through the kernel (rank r contributes r + 1); a wrong answer or a barrier that timed out
        makes the path unavailable instead of wrong."""
        for numel in (7, self.BLOCK * 3 + 5):
            x = torch.full((numel,), float(self.rank + 1), dtype=dtype, device=device)
            y = self.reduce(x)
            torch.cuda.synchronize(device)
            if int(self.error.item()) or not bool((y == self.world * (self.world + 1) // 2).all()):
                raise PathUnavailable(f"self-test failed (error word {int(self.error.item())})")


class LamportFusedNormPath:
    """All-reduce + residual add + RMSNorm in one Triton kernel (ferry/comm/fused_norm_kernel.py), for the sums
    a decoder layer adds to its residual stream. Not a plain all-reduce path: the engine offers it per size
    beside "the chosen path, then one add+RMSNorm kernel" (allreduce_engine.py)."""

    name = "ferry_fused_norm"
    label = "ferry all-reduce+add+RMSNorm (Lamport one-shot, Triton)"
    MAX_COLS = 16384  # one row per program, held in registers

    def __init__(self, process_group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        from ferry.comm.fused_norm_kernel import GENERATIONS, SENTINEL, STATE_WORDS

        if dtype not in (torch.bfloat16, torch.float16):
            raise PathUnavailable(f"the fused kernel takes 16-bit activations, not {dtype}")
        self.dtype, self.max_bytes = dtype, max_bytes
        self.slot_elems = max_bytes // dtype.itemsize
        group_name = process_group.group_name
        symm_mem.enable_symm_mem_for_group(group_name)
        # Every generation x every source rank's slot, as 16-bit words filled with the sentinel (-0.0).
        self.buffer = symm_mem.empty(GENERATIONS * dist.get_world_size(process_group) * self.slot_elems,
                                     dtype=torch.int16, device=device)
        self.buffer.fill_(SENTINEL.value)
        self.handle = symm_mem.rendezvous(self.buffer, group_name)
        self.rank, self.world = self.handle.rank, self.handle.world_size
        self.buffer_ptrs = torch.tensor(self.handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.state = torch.zeros(STATE_WORDS, dtype=torch.int64, device=device)
        self.error = torch.zeros(1, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=process_group)  # no peer pushes into a buffer before its owner has filled it
        self._self_test(device)

    unavailable_reason = staticmethod(FerryOneShotPath.unavailable_reason)  # symmetric memory and Triton

    def fits(self, partial: torch.Tensor, residual: torch.Tensor) -> bool:
        return (partial.dtype == self.dtype and residual.dtype == self.dtype and partial.is_contiguous()
                and residual.is_contiguous() and partial.numel() * partial.element_size() <= self.max_bytes
                and partial.shape[-1] <= self.MAX_COLS)

    def reduce_add_norm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                        eps: float) -> torch.Tensor | None:
        import triton

        from ferry.comm.fused_norm_kernel import lamport_allreduce_norm_kernel
        from ferry.model.layers.fused_kernels import norm_warps

        n = partial.shape[-1]
        rows = partial.numel() // n
        out = torch.empty_like(partial) if weight is not None else None
        if rows == 0:
            return out
        block = triton.next_power_of_2(n)
        lamport_allreduce_norm_kernel[(rows,)](
            partial, residual, weight if weight is not None else partial, out if out is not None else partial,
            self.buffer_ptrs, self.state, self.error, n, self.slot_elems, eps, self.rank,
            world=self.world, BLOCK=block, HAS_NORM=weight is not None, num_warps=norm_warps(block))
        return out

    def _self_test(self, device: torch.device) -> None:
        """Calls of changing row counts (every generation used, cleared and reused at a shorter and a longer
        length), inputs with -0.0 in them: each rank's result must equal the unfused sum, add and norm."""
        from ferry.model.layers.fused import rmsnorm_reference

        cols = 1000  # not a power of two: the masked tail runs too
        weight = torch.linspace(0.5, 1.5, cols, device=device).to(self.dtype)
        for call, rows in enumerate((1, 3, 2, 1, 4, 2, 1)):
            parts = []
            for r in range(self.world):
                gen = torch.Generator(device=device).manual_seed(call * 100 + r)
                part = torch.randn(rows, cols, generator=gen, device=device).to(self.dtype)
                part[:, ::7] = -0.0
                parts.append(part)
            residual = torch.full((rows, cols), 0.25, dtype=self.dtype, device=device)
            expected_sum = torch.stack([p.float() for p in parts]).sum(0).to(self.dtype)
            expected_residual = residual + expected_sum
            expected = rmsnorm_reference(expected_residual, weight, 1e-5)
            out = self.reduce_add_norm(parts[self.rank].clone(), residual, weight if call % 3 else None, 1e-5)
            torch.cuda.synchronize(device)
            if int(self.error.item()):
                raise PathUnavailable("self-test: a peer's data never arrived (error word set)")
            if not torch.equal(residual, expected_residual):
                raise PathUnavailable(f"self-test: call {call} ({rows} rows) summed wrong")
            if out is not None and not torch.allclose(out.float(), expected.float(), rtol=2 ** -7, atol=1e-6):
                raise PathUnavailable(f"self-test: call {call} ({rows} rows) normed wrong")


def available_paths(process_group: dist.ProcessGroup | None, device: torch.device, dtype: torch.dtype,
                    max_bytes: int) -> tuple[list, dict[str, str]]:
    """Every path this group can run here, and for the others the reason they cannot."""
    candidates = {  # name -> (why it cannot run here, or None; how to build it)
        "symm_one_shot": (SymmetricMemoryPath.unavailable_reason,
                          lambda: SymmetricMemoryPath("one_shot", process_group, device, dtype, max_bytes)),
        "symm_two_shot": (SymmetricMemoryPath.unavailable_reason,
                          lambda: SymmetricMemoryPath("two_shot", process_group, device, dtype, max_bytes)),
        FerryOneShotPath.name: (FerryOneShotPath.unavailable_reason,
                                lambda: FerryOneShotPath(process_group, device, dtype, max_bytes)),
        HostSharedMemoryPath.name: (HostSharedMemoryPath.unavailable_reason,
                                    lambda: HostSharedMemoryPath(process_group, min(max_bytes, HOST_SHM_BYTES))),
    }
    started, skipped = _start(candidates, process_group, device)
    paths = [ProcessGroupPath(process_group), *started]
    return _agreed(paths, skipped, [ProcessGroupPath.name, *candidates], process_group, device), skipped


def _start(candidates: dict, process_group, device: torch.device) -> tuple[list, dict[str, str]]:
    """Build each candidate {name: (unavailable_reason, build)} this rank can run; the others' reasons."""
    paths: list = []
    skipped: dict[str, str] = {}
    strict = os.environ.get("FERRY_STRICT_PATHS") == "1"
    for name, (unavailable_reason, build) in candidates.items():
        reason = unavailable_reason(process_group, device)
        if reason is not None:  # known in advance (no CUDA, no NCCL group): expected, so INFO
            log.info("all-reduce path %s not available: %s", name, reason)
            skipped[name] = reason
            continue
        try:
            paths.append(build())
        except Exception as exc:
            if strict and not isinstance(exc, MACHINE_CANNOT):
                raise
            skipped[name] = error_chain(exc)
            log.warning("all-reduce path %s failed to start and is not offered: %s", name, skipped[name])
    return paths, skipped


def _agreed(paths: list, skipped: dict[str, str], names: list[str], process_group, device: torch.device) -> list:
    """Only paths every rank could build: ranks that offered different sets would pick different paths for the
    same message and deadlock. Every CUDA rank takes part, whatever it built itself."""
    if device.type != "cuda":
        return paths  # no symmetric memory off CUDA: every rank reached the same verdict for the same reason
    have = {p.name for p in paths}
    flags = torch.tensor([1 if n in have else 0 for n in names], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=process_group)
    everywhere = {n for n, f in zip(names, flags.tolist(), strict=True) if f}
    for p in paths:
        if p.name not in everywhere:
            skipped[p.name] = "not available on every rank"
            log.warning("all-reduce path %s is not offered: another rank could not start it", p.name)
    return [p for p in paths if p.name in everywhere]


def fused_norm_path(process_group: dist.ProcessGroup | None, device: torch.device, dtype: torch.dtype,
                    max_bytes: int) -> tuple[LamportFusedNormPath | None, str | None]:
    """The fused all-reduce + add + RMSNorm path where every rank could start it; else None and the reason."""
    name = LamportFusedNormPath.name
    started, skipped = _start({name: (LamportFusedNormPath.unavailable_reason,
                                      lambda: LamportFusedNormPath(process_group, device, dtype, max_bytes))},
                              process_group, device)
    agreed = _agreed(started, skipped, [name], process_group, device)
    return (agreed[0] if agreed else None), skipped.get(name)
