"""How fast each rank's device runs this model: the measurement that sizes uneven splits.

Each rank times Ferry's own decode step on its device with one and with three decoder layers of the model's shape
(cost_model.time_engine_steps: random weights, the real path, CUDA graphs on GPUs), at the rows a micro-batch
holds. A layer's time and the step's fixed part (embedding, LM head, sampling, the host's work) come out; they
are cached per machine, device, thread count, dtype and shape, like the all-reduce calibration, so only the first
run pays. Then:

- pipeline stages get layer counts that make them finish together: the fewest seconds T such that every stage
  fits its layers and its fixed part (the last stage's LM head, which on a small model weighs several layers)
  into T (balance_layers);
- tensor-parallel ranks of unequal speed get heads and FFN columns in proportion to their speed (tp_shares).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import torch

from ferry.cache import cache_root
from ferry.model.config import ModelConfig

log = logging.getLogger("ferry.device_speed")
CALIBRATION_ROWS = 8  # decode rows timed: a typical micro-batch


@dataclass(frozen=True)
class DeviceSpeed:
    device: str  # what was timed, e.g. "cuda:0 NVIDIA H200 bf16" or "cpu x8 threads fp32"
    layer_s: float  # one decoder layer of a decode step of `rows` rows
    fixed_s: float  # what the step adds beyond its layers: embedding, LM head, sampling, the host's work
    rows: int
    # The layer's MLP matmuls alone (gate/up and down) at `rows` rows: the work tensor parallelism divides. Shares
    # follow it, not the whole layer, whose norms and residual adds every rank runs in full whatever its share.
    matmul_s: float = 0.0


def describe_device(device: torch.device, dtype: torch.dtype, slowdown: int = 1) -> str:
    if device.type == "cpu":
        what = f"cpu x{torch.get_num_threads()} threads"
    elif device.type == "cuda":
        what = f"{device} {torch.cuda.get_device_name(device)}"
    else:
        what = str(device)
    return f"{what} {str(dtype).removeprefix('torch.')}" + (f" slowed x{slowdown}" if slowdown > 1 else "")


def measure(config: ModelConfig, device: torch.device, dtype: torch.dtype, slowdown: int = 1,
            rows: int = CALIBRATION_ROWS, use_cache: bool = True, threads: int | None = None) -> DeviceSpeed:
    """This device's time per layer and fixed time per step for `config`'s shape, from the cache when it was
    measured before on this machine. `threads`: time with this many CPU threads (a rank's share of the cores),
    this process's setting restored after."""
    if threads is not None and threads != torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure(config, device, dtype, slowdown, rows, use_cache)
        finally:
            torch.set_num_threads(before)
    from ferry.parallel.cost_model import time_engine_steps

    name = describe_device(device, dtype, slowdown)
    key = f"{name}|{config.hidden_size}x{config.intermediate_size}|{config.num_heads}/{config.num_kv_heads}" \
          f"|{config.vocab_size}|rows{rows}|v3"
    path = cache_root() / "device_speed.json"
    cached = _read(path)
    if use_cache and key in cached:
        return DeviceSpeed(**cached[key])
    calibration = time_engine_steps(config, device, dtype, token_counts=(rows,), new_tokens=8, repeats=2,
                                    slowdown=slowdown)
    matmul_s = time_mlp_matmuls(config, device, dtype, rows, slowdown)
    # A layer is the difference of two short timings, which a busy host can push below the layer's own MLP
    # matmuls (timed alone, the median of many): those bound it from below.
    layer_s = max(calibration.layer_seconds(rows), matmul_s, 1e-7)
    speed = DeviceSpeed(name, layer_s, calibration.fixed_seconds(rows) or 0.0, rows, matmul_s)
    log.info("measured %s: %.3f ms per layer (%.3f ms of MLP matmuls), %.3f ms fixed per step (%d rows)", name,
             speed.layer_s * 1e3, speed.matmul_s * 1e3, speed.fixed_s * 1e3, rows)
    if use_cache:
        cached = _read(path)  # another rank may have written meanwhile
        cached[key] = asdict(speed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    return speed


def time_mlp_matmuls(config: ModelConfig, device: torch.device, dtype: torch.dtype, rows: int,
                     slowdown: int = 1, repeats: int = 20) -> float:
    """Seconds of one layer's gate/up and down matmuls at `rows` rows (the median of `repeats`, after a warm-up),
    through the layers Ferry runs (an emulated slowdown included)."""
    import statistics
    import time

    from ferry.comm.group import ParallelGroup
    from ferry.model.layers.linear import ColumnParallelLinear, RowParallelLinear

    h, f = config.hidden_size, config.intermediate_size
    single = ParallelGroup.single()
    gate_up = ColumnParallelLinear(h, [f, f], single).to(device, dtype)
    down = RowParallelLinear(f, h, single).to(device, dtype)
    for m in (gate_up, down):
        m.weight.data.normal_(0.0, 0.02)
        m.slowdown = slowdown
    x = torch.randn(rows, h, device=device, dtype=dtype)
    sync = torch.accelerator.synchronize if device.type != "cpu" else (lambda: None)
    samples = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            sync()
            started = time.perf_counter()
            down(gate_up(x)[:, :f])
            sync()
            if i >= 2:
                samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _read(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stage_layer_seconds(rank_layer_s: list[float], weighted: bool) -> float:
    """One layer's time on a stage of tensor-parallel ranks: with shares in proportion to speed every rank takes
    1 / sum(1 / t); split evenly, the slowest rank's 1/tp of a layer sets the pace."""
    if weighted:
        return 1.0 / sum(1.0 / t for t in rank_layer_s)
    return max(rank_layer_s) / len(rank_layer_s)


def balance_layers(layer_s: list[float], fixed_s: list[float], num_layers: int) -> list[int]:
    """Layer counts per stage (each >= 1, summing to `num_layers`) minimising the slowest stage's time
    count x layer_s + fixed_s, where the stages' fixed parts are what they run besides layers (the first stage's
    embedding, the last's LM head)."""
    pp = len(layer_s)
    if num_layers < pp:
        raise ValueError(f"{num_layers} layers cannot fill {pp} stages")

    def counts_within(limit: float) -> list[int]:
        return [max(1, math.floor((limit - f) / t + 1e-9)) if limit > f else 1 for t, f in zip(layer_s, fixed_s)]

    # The smallest limit that fits every layer: one of the stage-time values count x t + f, searched in order.
    candidates = sorted({n * t + f for t, f in zip(layer_s, fixed_s) for n in range(1, num_layers + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(counts_within(candidates[mid])) >= num_layers:
            hi = mid
        else:
            lo = mid + 1
    counts = counts_within(candidates[lo])
    # Too many: take layers back from the stages whose time falls most, until the counts add up.
    while sum(counts) > num_layers:
        s = max((i for i in range(pp) if counts[i] > 1), key=lambda i: counts[i] * layer_s[i] + fixed_s[i])
        counts[s] -= 1
    return counts


def tp_shares(rank_layer_s: list[float]) -> tuple[float, ...]:
    """Each rank's weight in an uneven tensor-parallel split: its speed (from the time of the work the split
    divides), normalised to the fastest."""
    fastest = min(rank_layer_s)
    # Tenths: timing noise of a few percent is no speed difference, and equal shares keep the even split.
    return tuple(max(0.1, round(fastest / t, 1)) for t in rank_layer_s)


@dataclass(frozen=True)
class SpeedSplit:
    """A placement's layer counts and tensor-parallel shares, and the speeds they came from (for logs and JSON)."""

    layer_counts: tuple[int, ...] | None  # None: the placement gave them
    shares: tuple[tuple[float, ...] | None, ...]  # per stage
    speeds: tuple[dict, ...]  # per rank: device, layer_ms, fixed_ms (empty when nothing was measured)

    def to_json(self) -> dict:
        return {"layer_counts": list(self.layer_counts) if self.layer_counts else None,
                "shares": [list(s) if s else None for s in self.shares], "speeds": list(self.speeds)}


def needs_measuring(placement) -> bool:
    return placement.measured_split or any(s.shares == "auto" for s in placement.stages)


def split_by_speed(placement, num_layers: int, speeds: list[DeviceSpeed] | None) -> SpeedSplit:
    """Layer counts (where the placement leaves them to measurement) and each stage's TP shares, from every rank's
    measured speed (rank order; None when nothing needs measuring)."""
    tp = placement.tp
    shares = []
    for s, stage in enumerate(placement.stages):
        if stage.shares == "auto":
            ranks = [speeds[s * tp + t] for t in range(tp)]
            shares.append(tp_shares([r.matmul_s or r.layer_s for r in ranks]))
        else:
            shares.append(stage.shares)
    counts = None
    if placement.measured_split:
        layer_s = [stage_layer_seconds([speeds[s * tp + t].layer_s for t in range(tp)], shares[s] is not None)
                   for s in range(placement.pp)]
        # The last stage also runs the LM head: the step's measured fixed part, most of which is the head.
        fixed_s = [0.0] * (placement.pp - 1) + [max(speeds[-1 - t].fixed_s for t in range(tp))]
        counts = tuple(balance_layers(layer_s, fixed_s, num_layers))
    report = tuple({"device": sp.device, "layer_ms": round(sp.layer_s * 1e3, 4), "fixed_ms": round(sp.fixed_s * 1e3, 4),
                    "mlp_matmul_ms": round(sp.matmul_s * 1e3, 4)} for sp in speeds or ())
    return SpeedSplit(counts, tuple(shares), report)
