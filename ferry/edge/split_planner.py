"""Choosing the split point K from measurements: the link's RTT and bandwidth, both sides' per-layer time, and
the bytes the session's codec puts on the wire at each K.

Predicted time of a request (P prompt tokens, N decode tokens) for split K (edge runs layers 0..K-1, cloud
K..L-1 and the head); the prefill's reply is the first token:

    prefill(K) = P * edge_prefill_s * K + RTT + P * (wire_prefill[K] / bandwidth + codec_s)
                 + P * cloud_prefill_s * (L - K) + cloud_head_s
    decode(K)  = edge_layer_s * K + RTT + wire[K] / bandwidth + codec_s + cloud_layer_s * (L - K) + cloud_head_s
    total(K)   = prefill(K) + (N - 1) * decode(K)          ranked by total(K) / N, seconds per token

Every term is measured, not assumed: the edge times its own layers, the cloud reports its own (PONG, measured
under whatever load it carries then), the link is probed with a small and a large PING, and wire[K] is the
encoded size of the prompt's own hidden state after layer K-1 (it differs with K only for compressing codecs:
hidden states grow and sharpen with depth). With the compute terms linear in K, an interior K wins only where
the link term says so; otherwise the faster side takes all the layers it may.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ferry.edge.codecs import Codec
from ferry.engine.kv_cache import KVCache
from ferry.model.loader import LoadedModel

FRAME_OVERHEAD = 40  # header + position fields of a HIDDEN frame


@dataclass(frozen=True)
class ComputeProfile:
    layer_s: float  # one decoder layer, one decode token, batch 1
    head_s: float  # final norm + LM head, one token
    prefill_layer_s: float | None = None  # one decoder layer, per token of a batched prefill (None: as decode)

    @property
    def prefill_s(self) -> float:
        return self.layer_s if self.prefill_layer_s is None else self.prefill_layer_s


@dataclass(frozen=True)
class LinkProfile:
    rtt_s: float
    bandwidth_Bps: float


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 0  # prefill: these hidden states cross the link once
    decode_tokens: int = 1  # what the request asks for (max_tokens)


@dataclass(frozen=True)
class WireBytes:
    """Bytes on the wire per token at each split K: a decode step's frame, and per prompt token of the prefill."""

    decode: Mapping[int, int]
    prefill: Mapping[int, float]

    @classmethod
    def uniform(cls, decode: int, prefill: float | None = None, num_layers: int = 512) -> WireBytes:
        """The same size at every K (a fixed-size codec, or a measurement that did not look per K)."""
        return cls({k: decode for k in range(num_layers)}, {k: decode if prefill is None else prefill
                                                           for k in range(num_layers)})


@torch.inference_mode()
def measure_compute(loaded: LoadedModel, steps: int = 8, context: int = 64, prefill_tokens: int = 32,
                    first_layers: int | None = None) -> ComputeProfile:
    """Median time of a decode step's layers and head on this machine (after a warm-up step), and the per-token
    layer time of one `prefill_tokens` prefill.

    `first_layers`: time only those decoder layers and not the head (head_s 0), for an edge that has read just
    them (a partial model); every layer costs the same."""
    model, cfg = loaded.model, loaded.config
    count = cfg.num_layers if first_layers is None else first_layers
    device = model.norm.weight.device
    cache = KVCache.for_model(model, count)
    cache.ensure(1, max(context + steps + 2, prefill_tokens))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    x = model.embed_tokens(torch.tensor([[1]], device=device))
    layers, heads = [], []
    for i in range(steps + 1):
        positions = torch.tensor([[context + i]], device=device)
        t = time.perf_counter()
        h = model.run_layers(x, positions, cache.layers, context + i + 1, range(count))
        sync()
        t1 = time.perf_counter()
        if first_layers is None:
            model.logits(h[:, -1])
        sync()
        if i:  # the first step warms up
            layers.append((t1 - t) / count)
            heads.append(time.perf_counter() - t1)
    prompt = model.embed_tokens(torch.ones(1, prefill_tokens, dtype=torch.long, device=device))
    positions = torch.arange(prefill_tokens, device=device).unsqueeze(0)
    t = time.perf_counter()
    model.run_layers(prompt, positions, cache.layers, prefill_tokens, range(count))
    sync()
    prefill = (time.perf_counter() - t) / (count * prefill_tokens)
    return ComputeProfile(statistics.median(layers), statistics.median(heads), prefill)


@torch.inference_mode()
def measure_wire_bytes(loaded: LoadedModel, codec: Codec, prompt_ids: list[int], sample_tokens: int = 64,
                       layers: int | None = None) -> WireBytes:
    """The codec's bytes for the prompt's hidden state after each layer: the last token's (a decode frame) and the
    mean per token over the prompt (the prefill), from the first `sample_tokens` of the prompt.

    `layers`: how many decoder layers are loaded (a partial edge model); splits deeper than that take the size
    measured after the last loaded layer."""
    model = loaded.model
    device = model.norm.weight.device
    ids = prompt_ids[:sample_tokens] or [1]
    num_layers = loaded.config.num_layers
    measured = num_layers - 1 if layers is None else max(1, min(layers, num_layers - 1))
    cache = KVCache.for_model(model, measured)
    cache.ensure(1, len(ids))
    x = model.embed_tokens(torch.tensor([ids], device=device))
    positions = torch.arange(len(ids), device=device).unsqueeze(0)
    decode, prefill = {}, {}
    for k in range(1, measured + 1):
        x = model.run_layers(x, positions, cache.layers[k - 1 : k], len(ids), range(k - 1, k))
        hidden = x[0].float().cpu()
        decode[k] = len(codec.encode(hidden[-1:])) + FRAME_OVERHEAD
        prefill[k] = len(codec.encode(hidden)) / len(ids)
    for k in range(measured + 1, num_layers):
        decode[k], prefill[k] = decode[measured], prefill[measured]
    return WireBytes(decode, prefill)


def predict(
    num_layers: int, edge: ComputeProfile, cloud: ComputeProfile, link: LinkProfile, wire: WireBytes | int,
    codec_s: float, min_edge_layers: int = 1, min_split: int = 1, workload: Workload = Workload(),
) -> list[dict]:
    """One row per feasible K with the predicted seconds per token and its parts (prefill spread over the
    tokens), best first."""
    if isinstance(wire, int):
        wire = WireBytes.uniform(wire, num_layers=num_layers)
    p, n = workload.prompt_tokens, max(1, workload.decode_tokens)
    rows = []
    for k in range(max(1, min_edge_layers, min_split), num_layers):
        step = {
            "edge_s": edge.layer_s * k,
            "link_s": link.rtt_s + wire.decode[k] / link.bandwidth_Bps + codec_s,
            "cloud_s": cloud.layer_s * (num_layers - k) + cloud.head_s,
        }
        prefill = {
            "edge_s": p * edge.prefill_s * k,
            "link_s": link.rtt_s + p * (wire.prefill[k] / link.bandwidth_Bps + codec_s),
            "cloud_s": p * cloud.prefill_s * (num_layers - k) + cloud.head_s,
        } if p else dict.fromkeys(step, 0.0)
        # the prefill's reply is the first token, so a request of n tokens is one prefill + n - 1 decode steps
        decode_steps = n - 1 if p else n
        parts = {name: (prefill[name] + decode_steps * step[name]) / n for name in step}
        rows.append({"split": k, "predicted_s": sum(parts.values()), **parts,
                     "prefill_s": sum(prefill.values()), "decode_step_s": sum(step.values())})
    # Predictions within a microsecond are a tie (rounding, not a difference): the fewer edge layers win it.
    return sorted(rows, key=lambda r: (round(r["predicted_s"], 6), r["split"]))


def format_table(rows: list[dict], top: int | None = None) -> str:
    lines = [f"{'split':>5} {'predicted ms/token':>19} {'edge ms':>8} {'link ms':>8} {'cloud ms':>9} {'prefill ms':>11}"]
    for r in sorted(rows[:top] if top else rows, key=lambda r: r["split"]):
        lines.append(f"{r['split']:>5} {r['predicted_s'] * 1e3:>19.2f} {r['edge_s'] * 1e3:>8.2f} "
                     f"{r['link_s'] * 1e3:>8.2f} {r['cloud_s'] * 1e3:>9.2f} {r['prefill_s'] * 1e3:>11.1f}")
    return "\n".join(lines)
