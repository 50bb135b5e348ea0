"""Choosing the split point K from measurements: the link's RTT and bandwidth, and both sides' per-layer time.

Predicted time per decode token for split K (edge runs layers 0..K-1, cloud K..L-1 and the head):

    edge_layer_s * K + encode/decode + RTT + bytes(hidden, codec) / bandwidth + cloud_layer_s * (L - K) + cloud_head_s

Every term is measured, not assumed: the edge times its own layers, the cloud reports its own (PONG), and the
link is probed with a small and a large PING.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ferry.engine.kv_cache import KVCache
from ferry.model.loader import LoadedModel


@dataclass(frozen=True)
class ComputeProfile:
    layer_s: float  # one decoder layer, one decode token, batch 1
    head_s: float  # final norm + LM head, one token


@dataclass(frozen=True)
class LinkProfile:
    rtt_s: float
    bandwidth_Bps: float


@torch.inference_mode()
def measure_compute(loaded: LoadedModel, steps: int = 8, context: int = 64,
                    first_layers: int | None = None) -> ComputeProfile:
    """Median time of a decode step's layers and head on this machine (after a warm-up step).

    `first_layers`: time only those decoder layers and not the head (head_s 0), for an edge that has read just
    them (a partial model); every layer costs the same."""
    model, cfg = loaded.model, loaded.config
    count = cfg.num_layers if first_layers is None else first_layers
    device = model.norm.weight.device
    cache = KVCache.for_model(model, count)
    cache.ensure(1, context + steps + 2)
    x = model.embed_tokens(torch.tensor([[1]], device=device))
    layers, heads = [], []
    for i in range(steps + 1):
        positions = torch.tensor([[context + i]], device=device)
        t = time.perf_counter()
        h = model.run_layers(x, positions, cache.layers, context + i + 1, range(count))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        if first_layers is None:
            model.logits(h[:, -1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            layers.append((t1 - t) / count)
            heads.append(time.perf_counter() - t1)
    return ComputeProfile(statistics.median(layers), statistics.median(heads))


def predict(
    num_layers: int, edge: ComputeProfile, cloud: ComputeProfile, link: LinkProfile, bytes_per_token: int,
    codec_s: float, min_edge_layers: int = 1, min_split: int = 1,
) -> list[dict]:
    """One row per feasible K with the predicted seconds per token and its parts, best first."""
    rows = []
    for k in range(max(1, min_edge_layers, min_split), num_layers):
        parts = {
            "edge_s": edge.layer_s * k,
            "link_s": link.rtt_s + bytes_per_token / link.bandwidth_Bps + codec_s,
            "cloud_s": cloud.layer_s * (num_layers - k) + cloud.head_s,
        }
        rows.append({"split": k, "predicted_s": sum(parts.values()), **parts})
    return sorted(rows, key=lambda r: r["predicted_s"])


def format_table(rows: list[dict], top: int | None = None) -> str:
    lines = [f"{'split':>5} {'predicted ms/token':>19} {'edge ms':>8} {'link ms':>8} {'cloud ms':>9}"]
    for r in sorted(rows[:top] if top else rows, key=lambda r: r["split"]):
        lines.append(f"{r['split']:>5} {r['predicted_s'] * 1e3:>19.2f} {r['edge_s'] * 1e3:>8.2f} "
                     f"{r['link_s'] * 1e3:>8.2f} {r['cloud_s'] * 1e3:>9.2f}")
    return "\n".join(lines)
