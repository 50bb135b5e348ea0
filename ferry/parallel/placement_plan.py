"""`ferry plan --stages cuda:0,cpu`: every order and layer split of a pipeline over devices of different kinds,
its predicted decode speed and memory per device, from each device's measured speed (device_speed.py).

A stage's time for one micro-batch step of r rows is

    layers x layer_s(r) + (the LM head, sampling: the step's fixed part, last stage only) + its send

with layer_s(r) the measured time per layer at the calibration's rows, scaled linearly in rows above them (the
rule offload_plan.py uses), and a send that crosses the host costing its bytes over the measured host-to-device
bandwidth. A decode cycle is planner.py's pipeline rule, max(M' x slowest stage, sum of the stages), plus the
first stage's host work per micro-batch on GPUs (CostParams.pipeline_host_s). Orders matter: the last stage runs
the LM head, which on a CPU costs several layers (the head of Llama-3-8B reads 1 GiB a step).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

from ferry.errors import FerryError
from ferry.model.config import ModelConfig
from ferry.parallel.cost_model import CostParams
from ferry.parallel.device_speed import DeviceSpeed, balance_layers
from ferry.parallel.offload_plan import layer_bytes, table_bytes

HOST_HOP_ALPHA_S = 50e-6  # a gloo message's fixed cost between two processes of one host (ferry topo on CPU)


@dataclass(frozen=True)
class PlacedPrediction:
    devices: tuple[str, ...]  # one per stage, first stage first
    split: tuple[int, ...]
    stage_ms: tuple[float, ...]  # one micro-batch step of each stage, its send included
    cycle_ms: float
    decode_tok_s: float
    memory_gib: tuple[float, ...]  # weights per stage
    fits: bool

    @property
    def stages(self) -> str:
        """The --stages that runs it."""
        return ",".join(f"{d}={n}" for d, n in zip(self.devices, self.split, strict=True))

    def to_json(self) -> dict:
        return asdict(self) | {"stages": self.stages}


def _end_table(config: ModelConfig, dtype_bytes: int) -> int:
    """The table an end stage holds: the embedding (first) or the LM head (last; a tied one is the same table)."""
    return table_bytes(config, dtype_bytes) // (1 if config.tie_word_embeddings else 2)


def _layer_s(speed: DeviceSpeed, rows: int) -> float:
    return speed.layer_s * max(1.0, rows / speed.rows)


def predict_placed(config: ModelConfig, devices: tuple[str, ...], split: tuple[int, ...],
                   speeds: dict[str, DeviceSpeed], dtype_bytes: dict[str, int], memory_limits: dict[str, float],
                   batch: int, micro_batches: int, h2d_Bps: float | None, params: CostParams) -> PlacedPrediction:
    active = min(micro_batches, batch)
    rows = math.ceil(batch / active)
    stage_s, memory = [], []
    for s, (device, layers) in enumerate(zip(devices, split, strict=True)):
        speed = speeds[device]
        t = layers * _layer_s(speed, rows)
        last = s == len(devices) - 1
        if last:
            t += speed.fixed_s
        else:
            nxt = devices[s + 1]
            nbytes = rows * config.hidden_size * min(dtype_bytes[device], dtype_bytes[nxt])
            crosses_host = (device == "cpu") != (nxt == "cpu")
            if crosses_host and h2d_Bps:
                t += HOST_HOP_ALPHA_S + nbytes / h2d_Bps
            elif device == nxt == "cpu":
                t += HOST_HOP_ALPHA_S
        if s == 0 and device != "cpu":
            t += params.pipeline_host_s  # the host's work of a step, on the pipeline's critical path
        stage_s.append(t)
        weights = layers * layer_bytes(config, dtype_bytes[device])
        if s == 0 or last:
            weights += _end_table(config, dtype_bytes[device])
        memory.append(weights)
    cycle = max(active * max(stage_s), sum(stage_s))
    fits = all(m <= memory_limits[d] for m, d in zip(memory, devices, strict=True))
    return PlacedPrediction(devices, split, tuple(round(t * 1e3, 3) for t in stage_s), round(cycle * 1e3, 3),
                            round(batch / cycle, 2), tuple(round(m / 2**30, 2) for m in memory), fits)


def candidate_splits(config: ModelConfig, devices: tuple[str, ...], speeds: dict[str, DeviceSpeed], rows: int,
                     caps: list[int]) -> list[tuple[int, ...]]:
    """The even split, the split that balances the measured stage times (within each stage's memory: `caps`
    layers at most), and that one with a layer moved between any two stages."""
    from ferry.model.layers.shard import shard_sizes

    n, pp = config.num_layers, len(devices)
    layer_s = [_layer_s(speeds[d], rows) for d in devices]
    balanced = balance_layers(layer_s, [0.0] * (pp - 1) + [speeds[devices[-1]].fixed_s], n)
    for s in range(pp):  # what a stage cannot hold goes to the fastest stages with room
        while balanced[s] > max(1, caps[s]):
            room = [i for i in range(pp) if balanced[i] < caps[i]]
            if not room:
                break
            balanced[s] -= 1
            balanced[min(room, key=lambda i: layer_s[i])] += 1
    splits = {tuple(shard_sizes(n, pp)), tuple(balanced)}
    for a, b in itertools.permutations(range(pp), 2):
        moved = list(balanced)
        moved[a] -= 1
        moved[b] += 1
        if min(moved) >= 1:
            splits.add(tuple(moved))
    return sorted(splits)


def layer_caps(config: ModelConfig, devices: tuple[str, ...], dtype_bytes: dict[str, int],
               memory_limits: dict[str, float]) -> list[int]:
    """Decoder layers each stage can hold beside its share of the tables."""
    caps = []
    for s, d in enumerate(devices):
        tables = _end_table(config, dtype_bytes[d]) if s in (0, len(devices) - 1) else 0
        caps.append(max(0, int((memory_limits[d] - tables) // layer_bytes(config, dtype_bytes[d]))))
    return caps


def plan_placed(config: ModelConfig, devices: list[str], speeds: dict[str, DeviceSpeed], dtype_bytes: dict[str, int],
                memory_limits: dict[str, float], batch: int, micro_batches: int | None, h2d_Bps: float | None,
                params: CostParams | None = None, keep_order: bool = False) -> list[PlacedPrediction]:
    """Every order of `devices` (or only the given one) and its candidate splits, fitting and fastest first."""
    if len(devices) < 2:
        raise FerryError("--stages: plan a pipeline of two or more devices")
    if len(devices) > config.num_layers:
        raise FerryError(f"--stages has {len(devices)} stages; the model has {config.num_layers} layers")
    params = params or CostParams()
    m = micro_batches or len(devices)
    rows = math.ceil(batch / min(m, batch))
    orders = [tuple(devices)] if keep_order else sorted(set(itertools.permutations(devices)))
    predictions = [predict_placed(config, order, split, speeds, dtype_bytes, memory_limits, batch, m, h2d_Bps, params)
                   for order in orders
                   for split in candidate_splits(config, order, speeds, rows,
                                                 layer_caps(config, order, dtype_bytes, memory_limits))]
    return sorted(predictions, key=lambda p: (not p.fits, -p.decode_tok_s))
