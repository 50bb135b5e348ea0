"""The machine as the planner sees it: nodes of equal devices (memory, memory bandwidth, matmul flops) and the
links between them as alpha-beta models, time = alpha + bytes / beta.

A Topology comes from a preset (figures from shared/reference, each quoted below), from a JSON file a person
can write by hand ("4 nodes x 8 H100, NVLink in node, 400 Gb/s between"), or from this machine: link_probe.py
names the devices and how each pair is joined and times transfers at a few sizes for every link's alpha and beta.

The JSON form, in units people write: {"nodes": 4, "devices_per_node": 8, "device": {"name": "H100"},
"intra_node": {"alpha_us": 9.7, "beta_GBps": 333}, "inter_node": {"alpha_us": 10, "beta_GBps": 50}}; a device
named after a known one (H100, H200) takes that one's memory_GiB, mem_bw_GBps and tflops unless given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import FerryError

GB, GiB = 1e9, float(1 << 30)


@dataclass(frozen=True)
class Link:
    alpha_s: float  # seconds a message costs whatever its size (latency, launch, handshake)
    beta_Bps: float  # bytes per second once it streams
    kind: str = ""  # "nvlink x18", "pcie", "ib", "gloo loopback": what the bytes cross

    def seconds(self, nbytes: float) -> float:
        return self.alpha_s + nbytes / self.beta_Bps

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "alpha_us": round(self.alpha_s * 1e6, 4), "beta_GBps": round(self.beta_Bps / GB, 4)}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Link:
        alpha, beta = _number(doc, "alpha_us", where), _number(doc, "beta_GBps", where)
        if alpha < 0 or beta <= 0:
            raise FerryError(f"{where}: alpha_us must be >= 0 and beta_GBps > 0, got {alpha} and {beta}")
        return cls(alpha * 1e-6, beta * GB, str(doc.get("kind", "")))


def fit_alpha_beta(points: list[tuple[float, float]], kind: str = "") -> Link:
    """Least squares of t = alpha + n / beta over (bytes, seconds) points, each weighted by 1/t^2: relative
    error, so the small messages set alpha and the large ones beta and neither drowns the other. Noise is
    clipped to a usable link: a flat or falling slope gives alpha = the fastest time and beta = the largest
    message's rate; a negative alpha becomes half the fastest time, the slope refitted through the largest."""
    if len(points) < 2 or len({n for n, _ in points}) < 2:
        raise ValueError("an alpha-beta fit needs at least two message sizes")
    w = [1.0 / t**2 for _, t in points]
    s, sx, sy = sum(w), sum(wi * n for wi, (n, _) in zip(w, points)), sum(wi * t for wi, (_, t) in zip(w, points))
    sxx = sum(wi * n * n for wi, (n, _) in zip(w, points))
    sxy = sum(wi * n * t for wi, (n, t) in zip(w, points))
    slope = (s * sxy - sx * sy) / (s * sxx - sx * sx)
    n_max, t_max = max(points)
    if slope <= 0:
        return Link(min(t for _, t in points), n_max / t_max, kind)
    alpha = (sy - slope * sx) / s
    if alpha <= 0:  # a line through the origin can not explain the small sizes; keep the smallest time as alpha
        alpha = min(t for _, t in points) * 0.5
        slope = max(1e-30, (t_max - alpha) / n_max)
    return Link(alpha, 1.0 / slope, kind)


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    mem_bw_Bps: float  # bytes/s a decode step reads weights at (a large copy's read + write rate)
    flops: float  # dense bf16 matmul flops/s (fp32 on a CPU without native bf16)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "memory_GiB": round(self.memory_bytes / GiB, 3),
                "mem_bw_GBps": round(self.mem_bw_Bps / GB, 3), "tflops": round(self.flops / 1e12, 4)}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Device:
        if not isinstance(doc, dict) or "name" not in doc:
            raise FerryError(f"{where}: a device needs a name (and memory_GiB, mem_bw_GBps, tflops unless the name "
                             f"is one of {', '.join(KNOWN_DEVICES)})")
        known = next((d for key, d in KNOWN_DEVICES.items() if key.lower() in str(doc["name"]).lower()), None)
        fallback = known.to_json() if known else {}
        merged = {**fallback, **doc}
        return cls(str(doc["name"]), _number(merged, "memory_GiB", where) * GiB,
                   _number(merged, "mem_bw_GBps", where) * GB, _number(merged, "tflops", where) * 1e12)


@dataclass(frozen=True)
class Topology:
    nodes: int
    devices_per_node: int
    device: Device
    intra_node: Link | None  # between two devices of one node (None: one device per node)
    inter_node: Link | None = None  # between nodes, device to device (None: one node)
    host_link: Link | None = None  # host <-> device, pinned (None: the device is the host)
    source: str = "file"
    details: dict = field(default_factory=dict, compare=False)  # discovery and raw timings, for people

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise FerryError(f"a topology needs nodes >= 1 and devices_per_node >= 1, got {self.nodes} and "
                             f"{self.devices_per_node}")
        if self.devices_per_node > 1 and self.intra_node is None:
            raise FerryError(f"{self.devices_per_node} devices per node need an intra_node link")
        if self.nodes > 1 and self.inter_node is None:
            raise FerryError(f"{self.nodes} nodes need an inter_node link")

    @property
    def total_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, device: int) -> int:
        return device // self.devices_per_node

    def link_between(self, a: int, b: int) -> Link:
        """The link device `a` and device `b` talk over (devices numbered node-major)."""
        link = self.intra_node if self.node_of(a) == self.node_of(b) else self.inter_node
        assert link is not None, "two devices need a link (checked in __post_init__)"
        return link

    def describe(self) -> str:
        nodes = f"{self.nodes} nodes x " if self.nodes > 1 else ""
        return f"{nodes}{self.devices_per_node} x {self.device.name} ({self.source})"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"nodes": self.nodes, "devices_per_node": self.devices_per_node,
                               "device": self.device.to_json(), "source": self.source}
        for name in ("intra_node", "inter_node", "host_link"):
            link = getattr(self, name)
            if link is not None:
                doc[name] = link.to_json()
        if self.details:
            doc["details"] = self.details
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str = "topology") -> Topology:
        if not isinstance(doc, dict):
            raise FerryError(f"{where}: expected a JSON object with nodes, devices_per_node, device, intra_node")
        nodes, per_node = int(_number(doc, "nodes", where)), int(_number(doc, "devices_per_node", where))
        links = {}
        for name, needed in (("intra_node", per_node > 1), ("inter_node", nodes > 1), ("host_link", False)):
            if name in doc:
                links[name] = Link.from_json(doc[name], f"{where}: {name}")
            elif needed:
                raise FerryError(f"{where}: missing field '{name}' (alpha_us and beta_GBps of the link)")
        return cls(nodes, per_node, Device.from_json(doc.get("device"), f"{where}: device"),
                   links.get("intra_node"), links.get("inter_node"), links.get("host_link"),
                   str(doc.get("source", where)), dict(doc.get("details", {})))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Topology:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise FerryError(f"topology file {str(path)!r} does not exist (write one with `ferry topo --json`)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise FerryError(f"topology file {str(path)!r} is not readable JSON: {exc}") from None
        return cls.from_json(doc, f"topology file {path.name}")


def _number(doc: Any, key: str, where: str) -> float:
    if not isinstance(doc, dict) or key not in doc:
        raise FerryError(f"{where}: missing field '{key}'")
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FerryError(f"{where}: field '{key}' must be a number, got {value!r}")
    return float(value)


# Figures from the machines Ferry was measured on (their measured hardware floors). Memory is the capacity nvidia-smi
# reports (H200 143771 MiB) or the product's (H100 80 GiB); the runtime's own footprint is the planner's margin.
KNOWN_DEVICES = {
    # 2026-11-24_h200x2_peer_hf_allreduce_graph.json d2d_TBs_rw = 4.29 TB/s; 2026-11-24_h200x2_links.json
    # overlap.matmul_us = 1421 us for an 8192^3 bf16 matmul = 774 TFLOP/s.
    "H200": Device("NVIDIA H200", 143771 * 2**20, 4.29e12, 774e12),
    # 2026-11-28_h100x4_links.json overlap.matmul_us = 1389 us for 8192^3 = 791 TFLOP/s. No file measures the
    # H100's copy rate: its 3.35 TB/s spec times the H200's measured/spec ratio (4.29 / 4.8) = 3.0 TB/s.
    "H100": Device("NVIDIA H100 80GB HBM3", 80 * GiB, 3.0e12, 791e12),
}

# NVLink in a node: beta is GPU->GPU send/recv of 256 MiB (p2p_256MB_GBs); alpha an 8 KiB NCCL all-reduce inside
# a CUDA graph at 2 ranks, one step of the planner's all-reduce (no file has in-graph send/recv; `ferry topo`
# timed it at 13 us one way on 2 H200s, so PP sends here are, if anything, optimistic).
NVLINK_H200 = Link(10.07e-6, 346e9, "nvlink x18")  # 2026-11-24_h200x2_{links,peer_hf_allreduce_graph}.json
NVLINK_H100 = Link(9.72e-6, 333e9, "nvlink x18")  # 2026-11-28_h100x4_{links,allreduce_graph_w2}.json
# Host link: the alpha-beta fit of the h2d_pinned_us rows, 4 KiB to 1 GiB, in 2026-11-24_h200x2_links.json
# (the H100 machine's rows fit within 4% of it).
PCIE5_HOST = Link(18.4e-6, 58.1e9, "pcie gen5 x16, pinned")
# Between nodes: no reference file measures one. 400 Gb/s is a ConnectX-7 port's line rate (one NIC per GPU);
# alpha 10 us is an assumption of NCCL's network latency. `ferry topo` under torchrun measures the real link.
IB_400 = Link(10e-6, 400e9 / 8, "ib 400G")


def _preset(nodes: int, per_node: int, device: Device, intra: Link, inter: Link | None, name: str) -> Topology:
    return Topology(nodes, per_node, device, intra, inter, PCIE5_HOST, f"preset {name}")


PRESETS = {
    "h200x2-nvlink": lambda: _preset(1, 2, KNOWN_DEVICES["H200"], NVLINK_H200, None, "h200x2-nvlink"),
    "h100x4-nvlink": lambda: _preset(1, 4, KNOWN_DEVICES["H100"], NVLINK_H100, None, "h100x4-nvlink"),
    "h100x8-nodes4-ib400": lambda: _preset(4, 8, KNOWN_DEVICES["H100"], NVLINK_H100, IB_400, "h100x8-nodes4-ib400"),
    "h200x8-nodes2-ib400": lambda: _preset(2, 8, KNOWN_DEVICES["H200"], NVLINK_H200, IB_400, "h200x8-nodes2-ib400"),
}


def preset(name: str) -> Topology:
    if name not in PRESETS:
        raise FerryError(f"unknown topology preset {name!r} (choose {', '.join(PRESETS)})")
    return PRESETS[name]()


def parse_sizes(text: str) -> list[int]:
    """'4K,256K,4M' -> byte counts (K, M, G are powers of 1024)."""
    sizes = []
    for word in text.split(","):
        word = word.strip().upper().removesuffix("B").removesuffix("I")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(word[-1:], 1)
        digits = word[:-1] if scale > 1 else word
        if not digits.isdigit() or int(digits) == 0:
            raise FerryError(f"bad message size {text!r} (e.g. 4K,256K,4M)")
        sizes.append(int(digits) * scale)
    if len(set(sizes)) < 2:
        raise FerryError(f"--sizes needs at least two different sizes for an alpha-beta fit, got {text!r}")
    return sorted(set(sizes))
