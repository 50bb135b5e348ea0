"""A model larger than the GPU budget (`--gpu-memory`): stream the layers that do not fit over PCIe, or run them on
the CPU as a pipeline stage, whichever the measurements say is faster for this link and batch.

The layers that fit the budget stay on the GPU with the LM head (the head is the largest matmul; on a CPU it would
cost more than several layers). The rest are either

- streamed: kept in pinned host memory and copied into two GPU slots just ahead of their use (weight_stream.py);
  a streamed layer costs max(its GPU time, its bytes / the measured host-to-device bandwidth) per step, whatever
  the batch: every step reads every weight again;
- a CPU stage: the first layers run on the host (`--stages cpu=R,cuda:0=N`), and the pipeline's micro-batches keep
  both devices busy. A step of the CPU stage grows with the rows it computes, the copy does not, so small batches
  favour the CPU stage on fast hosts and large ones streaming; with M micro-batches a decode cycle is
  max(M x slowest stage, sum of the stages) for the batch's rows (planner.py's pipeline rule).

Predicted seconds per decode step for the whole batch, from each device's measured layer time at CALIBRATION_ROWS
rows (device_speed.py) scaled linearly in rows beyond it, and the measured pinned copy bandwidth.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ferry.errors import FerryError
from ferry.model.config import ModelConfig
from ferry.parallel.cost_model import RankShape
from ferry.parallel.device_speed import DeviceSpeed

GiB = 1 << 30
KV_SHARE = 0.1  # of the budget, kept for the KV cache and activations


def parse_size(text: str, flag: str = "--gpu-memory") -> int:
    """"24GiB", "24G", "1.5GB" or a byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise FerryError(f"{flag} {text!r}: give a size such as 24GiB")
    unit = {None: 1, "gib": GiB, "gb": GiB, "g": GiB, "mib": 1 << 20, "mb": 1 << 20, "m": 1 << 20}[m.group(2)]
    return int(float(m.group(1)) * unit)


def layer_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """One decoder layer's weights (matmuls and norms), whole: the cost model's one-rank shape."""
    return RankShape.of(config, 1).layer_params * dtype_bytes


def table_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """Embedding table and LM head (one table when tied) and the final norm."""
    tables = 1 if config.tie_word_embeddings else 2
    return (tables * config.vocab_size + 1) * config.hidden_size * dtype_bytes


def gpu_layers_within(config: ModelConfig, dtype_bytes: int, budget: int) -> int:
    """Decoder layers that fit the budget beside the tables, a KV_SHARE of it kept for the cache."""
    room = budget * (1 - KV_SHARE) - table_bytes(config, dtype_bytes)
    if room < layer_bytes(config, dtype_bytes):
        raise FerryError(f"--gpu-memory {budget / GiB:.1f} GiB does not hold the embedding and LM head "
                         f"({table_bytes(config, dtype_bytes) / GiB:.2f} GiB) and one layer; give more")
    return min(config.num_layers, int(room // layer_bytes(config, dtype_bytes)))


@dataclass(frozen=True)
class OffloadChoice:
    way: str  # "fits", "stream" or "cpu-stage"
    gpu_layers: int
    host_layers: int
    stream_s: float  # predicted seconds per decode step of the batch, streaming
    cpu_stage_s: float  # the same with a CPU stage
    why: str

    @property
    def stages(self) -> str:
        """The --stages of the CPU-stage layout."""
        return f"cpu={self.host_layers},cuda:0={self.gpu_layers}"

    def to_json(self) -> dict:
        return asdict(self) | {"stages": self.stages}


def _rows_scaled(speed: DeviceSpeed, rows: int) -> float:
    """A layer's time at `rows` rows: the measured one, linear in rows above the measured rows (compute-bound),
    never below it (weight reads bound small batches)."""
    return speed.layer_s * max(1.0, rows / speed.rows)


def choose(config: ModelConfig, dtype_bytes: int, budget: int, batch: int, gpu: DeviceSpeed | None,
           cpu: DeviceSpeed | None, h2d_Bps: float | None, micro_batches: int = 2, force: str = "auto"
           ) -> OffloadChoice:
    """Where the layers beyond the budget go; `force` ("stream" or "cpu") skips the comparison's verdict, not
    its figures (they are None-safe only for a model that fits)."""
    n = gpu_layers_within(config, dtype_bytes, budget)
    host = config.num_layers - n
    if host == 0:
        return OffloadChoice("fits", n, 0, 0.0, 0.0, f"all {n} layers fit {budget / GiB:.1f} GiB")
    rows = max(1, math.ceil(batch / micro_batches))
    t_gpu = _rows_scaled(gpu, batch)
    copy_s = layer_bytes(config, dtype_bytes) / h2d_Bps
    stream = gpu.fixed_s + n * t_gpu + host * max(t_gpu, copy_s)
    gpu_stage = gpu.fixed_s + n * _rows_scaled(gpu, rows)
    cpu_stage = host * _rows_scaled(cpu, rows)
    active = min(micro_batches, batch)
    cycle = max(active * max(gpu_stage, cpu_stage), gpu_stage + cpu_stage)
    way = {"stream": "stream", "cpu": "cpu-stage"}.get(force) or ("stream" if stream <= cycle else "cpu-stage")
    why = (f"{host} of {config.num_layers} layers exceed {budget / GiB:.1f} GiB: streaming them costs "
           f"{stream * 1e3:.1f} ms a step ({copy_s * 1e3:.2f} ms per layer copied at {h2d_Bps / 1e9:.1f} GB/s), "
           f"a CPU stage {cycle * 1e3:.1f} ms ({cpu.layer_s * 1e3:.2f} ms per layer at {cpu.rows} rows) at batch "
           f"{batch}" + ("" if force == "auto" else f"; {force} forced"))
    return OffloadChoice(way, n, host, stream, cycle, why)


def measure_devices(config: ModelConfig, gpu, gpu_dtype, cpu_dtype) -> tuple[DeviceSpeed, DeviceSpeed, float]:
    """The GPU's and the CPU's measured speeds for `config` (the CPU with the cores a CPU stage beside one GPU
    rank gets, placement.py) and the host-to-device bandwidth: what `choose` needs."""
    import os

    import torch

    from ferry.parallel.device_speed import measure

    cpu_threads = max(1, (os.cpu_count() or 3) - 2)
    return (measure(config, gpu, gpu_dtype), measure(config, torch.device("cpu"), cpu_dtype, threads=cpu_threads),
            measure_h2d_bandwidth(gpu))


def measure_h2d_bandwidth(device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Pinned host-to-device copy bandwidth, bytes/s (the best of `repeats`: the link's, not the noise's)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best
