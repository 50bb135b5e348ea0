"""The ways Ferry can sum a tensor over a tensor-parallel group, each behind one `reduce(tensor) -> tensor` call.

- `process_group`: torch.distributed.all_reduce on the group's backend (NCCL on GPUs, gloo on CPU).
- `symm_one_shot` / `symm_two_shot`: torch symmetric memory (CUDA, NVLink peers; multicast stays off). The
  input is copied into a buffer every rank allocated symmetrically, then each rank reads its peers' buffers
  directly: one-shot reads all of them (fewest steps, best for small messages), two-shot reduce-scatters then
  all-gathers (half the traffic per rank, better as messages grow). Both are capturable in CUDA graphs.

A path that cannot run here says why (`unavailable_reason`) instead of failing later or falling back silently.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger("ferry.allreduce")


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


class SymmetricMemoryPath:
    """One-shot or two-shot all-reduce through one symmetric buffer of `max_bytes` per rank.

    Messages always start at the buffer's first byte, so every message is a prefix of the rendezvoused tensor."""

    def __init__(self, kind: str, process_group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int) -> None:
        assert kind in ("one_shot", "two_shot")
        import torch.distributed._symmetric_memory as symm_mem

        self.name = f"symm_{kind}"
        self.label = f"symm-mem {kind.replace('_', '-')}"
        self.kind, self.max_bytes = kind, max_bytes
        self.group_name = process_group.group_name
        symm_mem.enable_symm_mem_for_group(self.group_name)  # a no-op where the torch build does it already
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

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


def available_paths(process_group: dist.ProcessGroup | None, device: torch.device, dtype: torch.dtype,
                    max_bytes: int) -> tuple[list, dict[str, str]]:
    """Every path this group can run here, and for the others the reason they cannot."""
    paths: list = [ProcessGroupPath(process_group)]
    skipped: dict[str, str] = {}
    reason = SymmetricMemoryPath.unavailable_reason(process_group, device)
    for kind in ("one_shot", "two_shot"):
        if reason:
            skipped[f"symm_{kind}"] = reason
            continue
        try:
            paths.append(SymmetricMemoryPath(kind, process_group, device, dtype, max_bytes))
        except Exception as exc:  # allocation / rendezvous refused by the driver or topology
            skipped[f"symm_{kind}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    for name, why in skipped.items():
        log.info("all-reduce path %s not available: %s", name, why)
    return paths, skipped
