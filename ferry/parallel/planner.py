"""`ferry plan`: every tensor x pipeline layout of a model on a topology, its predicted prefill time, decode
speed and memory per device, and the fastest layout that fits.

Placement: devices are numbered node-major and stage s holds devices [s tp, (s + 1) tp). tp divides a node's
device count (the TP group stays inside a node) or is a whole number of nodes (the group spans them and its
all-reduces cross the inter-node link, the slowest one in the ring); a stage boundary is one link or the other.

Pipeline (decode): M micro-batches, each a share of the batch; a micro-batch's next token needs its last one to
have crossed every stage, so with busy_s = stage s's time for one micro-batch + its send (hidden states to the
next stage; from the last stage, the sampled tokens back to the first)

    cycle = max(M' x max_s busy_s, sum_s busy_s),   M' = min(M, batch) (empty micro-batches cost nothing)

which for balanced stages is max(M', pp) x (slowest stage + its send). Every sequence gets one token a cycle:
time per output token = cycle, decode tokens/s = batch / cycle. In decode the first stage's busy time includes
the host's work of a step (CostParams.pipeline_host_s), which a pipeline cannot hide. Decode attends to prompt + output / 2 positions
(the average over the output). Prefill fills the pipe once: sum_s busy_s + (M' - 1) x max_s busy_s.
Terms per stage: cost_model.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ferry.comm.topology import Topology
from ferry.errors import FerryError
from ferry.model.config import ModelConfig
from ferry.model.layers.shard import shard_sizes
from ferry.parallel.cost_model import Calibration, CostParams, RankShape, stage_memory, stage_terms

TOKEN_ID_BYTES = 8  # the sampled tokens the last stage returns to the first (int64)


@dataclass(frozen=True)
class Workload:
    batch: int
    prompt: int
    output: int

    def check(self, config: ModelConfig) -> None:
        for name, value in (("--batch", self.batch), ("--prompt", self.prompt), ("--output", self.output)):
            if value < 1:
                raise FerryError(f"{name} must be 1 or more, got {value}")
        if self.prompt + self.output > config.max_context:
            raise FerryError(f"--prompt {self.prompt} + --output {self.output} exceeds the model's context of "
                             f"{config.max_context} positions")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    micro_batches: int
    split: tuple[int, ...]  # decoder layers per stage, first stage first

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    @property
    def name(self) -> str:
        return f"tp{self.tp} x pp{self.pp}"


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    fits: bool
    memory_bytes: float  # the fullest device's need
    memory: dict  # its parts: weights, kv_cache, margin
    memory_limit: float
    prefill_s: float
    tpot_s: float  # time per output token: one decode cycle
    decode_tok_s: float  # the whole batch's tokens per second
    tp_link: str
    pp_links: tuple[str, ...]
    decode_stages: tuple[dict, ...] = field(repr=False)  # per stage: terms in seconds, send, busy
    prefill_stages: tuple[dict, ...] = field(repr=False)

    @property
    def bottleneck(self) -> dict:
        """The decode terms of the slowest stage (one micro-batch), what --verbose shows."""
        return max(self.decode_stages, key=lambda s: s["busy"])

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["layout"] |= {"name": self.layout.name, "split": list(self.layout.split)}
        return doc


def tp_degrees(topo: Topology) -> list[int]:
    per = topo.devices_per_node
    return [d for d in range(1, per + 1) if per % d == 0] + [per * k for k in range(2, topo.nodes + 1)]


def check_layout(config: ModelConfig, topo: Topology, tp: int | None, pp: int | None) -> None:
    if tp is not None and tp not in tp_degrees(topo):
        raise FerryError(f"--tp {tp} neither divides the {topo.devices_per_node} devices of a node nor spans whole "
                         f"nodes; choose from {', '.join(map(str, tp_degrees(topo)))}")
    if tp is not None and tp > config.num_heads:
        raise FerryError(f"--tp {tp} is more ranks than this model's {config.num_heads} attention heads")
    if pp is not None and not 1 <= pp <= config.num_layers:
        raise FerryError(f"--pp must be between 1 and the model's {config.num_layers} layers, got {pp}")
    if (tp or 1) * (pp or 1) > topo.total_devices:
        raise FerryError(f"--tp {tp or 1} x --pp {pp or 1} needs {(tp or 1) * (pp or 1)} devices; the topology has "
                         f"{topo.total_devices}")


def stage_splits(num_layers: int, pp: int, max_shift: int = 2) -> list[tuple[int, ...]]:
    """The even split (the first stages take the remainder) and uneven ones: up to `max_shift` layers moved off
    the last stage (it also runs the LM head, worth a few layers of weight reads) or one off the first stage
    (it holds the embedding table), spread over the other stages from the first on."""
    even = shard_sizes(num_layers, pp)
    splits = [tuple(even)]
    if pp == 1:
        return splits
    moves = [(pp - 1, k) for k in range(1, max_shift + 1)] + [(0, 1)]
    for source, count in moves:
        split = list(even)
        others = [s for s in range(pp) if s != source]
        for i in range(count):
            split[source] -= 1
            split[others[i % len(others)]] += 1
        if min(split) >= 1 and tuple(split) not in splits:
            splits.append(tuple(split))
    return splits


def enumerate_layouts(config: ModelConfig, topo: Topology, tp: int | None = None, pp: int | None = None,
                      micro_batches: int | None = None) -> list[Layout]:
    check_layout(config, topo, tp, pp)
    if micro_batches is not None and micro_batches < 1:
        raise FerryError(f"--micro-batches must be 1 or more, got {micro_batches}")
    layouts = []
    for t in [tp] if tp else [d for d in tp_degrees(topo) if d <= config.num_heads]:
        for p in [pp] if pp else range(1, min(topo.total_devices // t, config.num_layers) + 1):
            if t * p > topo.total_devices:  # a --pp too long for this TP degree's groups
                continue
            for split in stage_splits(config.num_layers, p):
                layouts.append(Layout(t, p, micro_batches or p, split))
    return layouts


def predict(config: ModelConfig, topo: Topology, layout: Layout, work: Workload, params: CostParams | None = None,
            calibration: Calibration | None = None) -> Prediction:
    params = params or CostParams()
    tp, pp, split = layout.tp, layout.pp, layout.split
    check_layout(config, topo, tp, pp)
    if sum(split) != config.num_layers or len(split) != pp or min(split) < 1:
        raise FerryError(f"split {split} does not give each of {pp} stages at least one of {config.num_layers} layers")
    shape = RankShape.of(config, tp)
    tp_link = None if tp == 1 else topo.link_between(0, tp - 1)
    active = min(layout.micro_batches, work.batch)
    rows = math.ceil(work.batch / active)
    h, b = config.hidden_size, params.dtype_bytes

    def run(tokens: int, context: int, send_bytes: float) -> list[dict]:
        stages = []
        for s, layers in enumerate(split):
            terms = stage_terms(config, shape, topo.device, tp_link, layers, rows, tokens, context, s == 0,
                                s == pp - 1, params, calibration)
            if pp > 1 and s == 0 and tokens == 1:
                terms["pipeline_host"] = params.pipeline_host_s
            send = 0.0
            if pp > 1:  # to the next stage; the last returns the sampled tokens to the first
                link = topo.link_between(s * tp, ((s + 1) % pp) * tp)
                send = link.seconds(send_bytes if s < pp - 1 else rows * TOKEN_ID_BYTES)
            stages.append({"layers": layers, **terms, "pp_send": send, "busy": sum(terms.values()) + send})
        return stages

    decode = run(1, work.prompt + work.output // 2, rows * h * b)
    prefill = run(work.prompt, work.prompt, rows * work.prompt * h * b)
    slowest = max(s["busy"] for s in decode)
    cycle = max(active * slowest, sum(s["busy"] for s in decode))
    prefill_s = sum(s["busy"] for s in prefill) + (active - 1) * max(s["busy"] for s in prefill)
    kv_tokens = work.batch * (work.prompt + work.output)
    memories = [stage_memory(config, shape, layers, s == 0, s == pp - 1, pp, kv_tokens, params)
                for s, layers in enumerate(split)]
    memory = max(memories, key=lambda m: sum(m.values()))
    need = sum(memory.values())
    pp_links = tuple(topo.link_between(s * tp, (s + 1) * tp).kind for s in range(pp - 1))
    return Prediction(layout, need <= topo.device.memory_bytes, need, memory, topo.device.memory_bytes, prefill_s,
                      cycle, work.batch / cycle, tp_link.kind if tp_link else "", pp_links, tuple(decode),
                      tuple(prefill))


@dataclass(frozen=True)
class Plan:
    predictions: tuple[Prediction, ...]  # fitting first, fastest decode first
    recommended: Prediction | None
    config: ModelConfig
    model_name: str
    topology: Topology
    workload: Workload
    params: CostParams
    calibration: Calibration | None = None

    def to_json(self) -> dict:
        c = self.config
        return {
            "model": {"name": self.model_name, "layers": c.num_layers, "hidden": c.hidden_size, "heads": c.num_heads,
                      "kv_heads": c.num_kv_heads, "vocab": c.vocab_size, "params": c.num_params},
            "workload": asdict(self.workload), "params": asdict(self.params),
            "calibration": asdict(self.calibration) if self.calibration else None,
            "topology": self.topology.to_json(),
            "recommended": self.recommended.to_json() if self.recommended else None,
            "layouts": [p.to_json() for p in self.predictions],
        }


def plan(config: ModelConfig, topo: Topology, work: Workload, params: CostParams | None = None,
         tp: int | None = None, pp: int | None = None, micro_batches: int | None = None,
         calibration: Calibration | None = None, model_name: str = "") -> Plan:
    work.check(config)
    params = params or CostParams()
    preds = [predict(config, topo, lay, work, params, calibration)
             for lay in enumerate_layouts(config, topo, tp, pp, micro_batches)]
    # Ties (layouts alike in speed) go to fewer devices, then the faster prefill.
    preds.sort(key=lambda p: (not p.fits, -round(p.decode_tok_s, 6), p.layout.devices, p.prefill_s))
    best = preds[0] if preds and preds[0].fits else None
    return Plan(tuple(preds), best, config, model_name, topo, work, params, calibration)


def load_model_config(model: Path | None, shape: str | None) -> tuple[str, ModelConfig]:
    """A checkpoint's config (no weights read) or a named shape from ferry.bench.shapes (default llama3-8b)."""
    if model is not None and shape is not None:
        raise FerryError("give --model or --shape, not both")
    if model is not None:
        from ferry.model.loader import open_checkpoint

        _, config, _ = open_checkpoint(Path(model).expanduser())
        return Path(model).name, config
    from ferry.bench.shapes import SHAPES

    shape = shape or "llama3-8b"
    if shape not in SHAPES:
        raise FerryError(f"unknown --shape {shape!r} (choose {', '.join(SHAPES)})")
    return shape, SHAPES[shape]
