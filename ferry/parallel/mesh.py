"""Ranks laid out as `pp` pipeline stages of `tp` tensor-parallel ranks, and the process groups of that layout.

Rank r is tensor-parallel rank r % tp of stage r // tp: consecutive ranks share a stage, and torchrun numbers a
node's processes consecutively, so with one stage per node the all-reduces (two per layer per token) stay on the
node's fast links and only one hidden state per micro-batch crosses the slow link between nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from ferry.comm.group import ParallelGroup
from ferry.errors import FerryError
from ferry.parallel.layout import check_rank_count


@dataclass(frozen=True)
class Mesh:
    tp: int = 1
    pp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp

    def stage_of(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tp

    def rank_at(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank_at(stage, r) for r in range(self.tp)]

    def __str__(self) -> str:
        return f"tp={self.tp} x pp={self.pp}"


def check_mesh(tp: int, pp: int) -> Mesh:
    check_rank_count(tp)
    if pp < 1:
        raise FerryError(f"--pp must be 1 or more (one stage per device group), got {pp}")
    return Mesh(tp, pp)


def mesh_under_torchrun(tp: int | None, pp: int | None, world: int, local_world: int) -> Mesh:
    """The layout of torchrun's `world` ranks (`local_world` per node). Nothing said: tensor parallel inside a
    node and pipeline across nodes. One of the two said: the other fills the world. Both: they must multiply to
    `world`."""
    if tp is None and pp is None:
        tp, pp = local_world, world // local_world
    elif pp is None:
        pp = world // tp if tp >= 1 and world % tp == 0 else 0
    elif tp is None:
        tp = world // pp if pp >= 1 and world % pp == 0 else 0
    if tp * pp != world:
        raise FerryError(f"torchrun started {world} ranks ({local_world} per node); --tp {tp} x --pp {pp} must "
                         f"be {world}")
    return check_mesh(tp, pp)


def torchrun_layout() -> tuple[int, int]:
    """(world size, ranks per node) of this torchrun job."""
    world = int(os.environ["WORLD_SIZE"])
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


@dataclass(frozen=True)
class StagePeers:
    """Where this rank's pipeline traffic goes: the same tensor-parallel rank of the neighbouring stages (each
    holds the full hidden state after its all-reduce), and every earlier stage for the sampled tokens."""

    mesh: Mesh
    rank: int

    @property
    def stage(self) -> int:
        return self.mesh.stage_of(self.rank)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.mesh.pp - 1

    @property
    def previous(self) -> int:
        return self.mesh.rank_at(self.stage - 1, self.mesh.tp_rank_of(self.rank))

    @property
    def next(self) -> int:
        return self.mesh.rank_at(self.stage + 1, self.mesh.tp_rank_of(self.rank))

    @property
    def token_source(self) -> int:
        return self.mesh.rank_at(self.mesh.pp - 1, self.mesh.tp_rank_of(self.rank))

    def token_receivers(self) -> list[int]:
        return [self.mesh.rank_at(s, self.mesh.tp_rank_of(self.rank)) for s in range(self.mesh.pp - 1)]


def split_groups(mesh: Mesh, rank: int, compression: str | None,
                 stage_backends: list[str] | None = None) -> ParallelGroup:
    """This rank's tensor-parallel group. Every rank creates every stage's group, in one order (new_group is a
    collective over the whole world), and keeps its own. `stage_backends`: each stage's backend where stages are
    on different kinds of device (the world group is then gloo); else the world's."""
    if mesh.tp == 1:
        return ParallelGroup.single()
    if mesh.pp == 1:
        return ParallelGroup(rank=rank, world_size=mesh.tp, process_group=dist.group.WORLD, compression=compression)
    mine = None
    for stage in range(mesh.pp):
        group = dist.new_group(mesh.stage_ranks(stage), backend=stage_backends[stage] if stage_backends else None)
        if stage == mesh.stage_of(rank):
            mine = group
    return ParallelGroup(rank=mesh.tp_rank_of(rank), world_size=mesh.tp, process_group=mine, compression=compression)
