"""What one pipeline stage costs on one tensor-parallel rank: roofline compute, KV reads, collectives, launches.

Per decoder layer, for `rows` sequences of `tokens` new tokens each, attending to `context` cached positions:

    compute  = max(weight bytes per rank / memory bandwidth, flops per rank / flops)
    kv       = rows x context x 2 (K and V) x KV heads per rank x head_dim x dtype bytes / memory bandwidth
    tp       = 2 all-reduces (attention output, MLP output) of rows x tokens x hidden x dtype bytes

and an all-reduce over n ranks on a link (alpha, beta) is modelled as

    ceil(log2 n) alpha + 2 (n - 1) / n x bytes / beta

one message latency per doubling step and the bytes of a ring (each rank sends and receives 2 (n - 1) / n of
the message). alpha is a link's one-way in-graph message time, which is about one small all-reduce's time at
2 ranks (2 H200s, CUDA graphs: 8 KiB all-reduce 10.1 us in shared/reference, send/recv 13 us one way as
`ferry topo` timed it); 4 H100s measured 16.2 us where this says 19.4.
The first stage adds the embedding (a row read and, with TP, its all-reduce), the last the LM head (its weight
read or its matmul, then an all-gather of the logits over the TP group), every stage one fixed launch overhead.
With a calibration (Ferry's decode step timed on this device at two depths, `time_engine_steps`) its
measured time per layer replaces compute + kv: the launch and latency floor a layer shows at one row (what
exceeds its weight read) stays whole on every TP rank, the rest divides over them; and the step's measured fixed
part (host, launches, sampling) replaces the fixed overhead, the LM head's share of it only on the last stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ferry.comm.topology import Device, Link
from ferry.model.config import ModelConfig
from ferry.model.layers.heads import HeadShard

GiB = 1 << 30


@dataclass(frozen=True)
class CostParams:
    dtype_bytes: int = 2  # bf16 weights, activations and KV cache
    # One stage forward's fixed cost: graph launch, host work, sampling on the last stage. An assumption (no
    # reference file isolates it); with CUDA graphs Ferry's decode step pays tens of microseconds.
    step_overhead_s: float = 30e-6
    activation_margin_bytes: int = 2 * GiB  # activations, CUDA context and graphs, allocator slack, per device
    # A pipeline's first stage schedules a micro-batch's step only once the last stage's tokens for it are back,
    # so the host's work of a step (read the tokens, schedule, upload, launch), which one device hides under the
    # previous step's GPU work, is on the pipeline's critical path once per micro-batch. 0.4-0.7 ms measured on
    # 2x H200 (benchmarks/results/2026-11-30_pp_decode_llama3-8b_cuda.json against the plan without this term).
    pipeline_host_s: float = 500e-6


@dataclass(frozen=True)
class RankShape:
    """The largest per-rank share at one tensor-parallel degree (uneven shards: the first ranks take more)."""

    tp: int
    q_heads: int
    kv_heads: int
    layer_params: int  # matmul weights + norms of one decoder layer on this rank
    vocab_rows: int  # embedding / LM head rows on this rank

    @classmethod
    def of(cls, config: ModelConfig, tp: int) -> RankShape:
        shards = [HeadShard.for_rank(config.num_heads, config.num_kv_heads, tp, r) for r in range(tp)]
        q, kv = max(s.num_heads for s in shards), max(s.num_kv_heads for s in shards)
        h, hd = config.hidden_size, config.head_dim
        attn = h * (q + 2 * kv) * hd + q * hd * h
        mlp = 3 * h * math.ceil(config.intermediate_size / tp)
        return cls(tp, q, kv, attn + mlp + 2 * h, math.ceil(config.vocab_size / tp))


def allreduce_seconds(link: Link, ranks: int, nbytes: float) -> float:
    if ranks <= 1:
        return 0.0
    return math.ceil(math.log2(ranks)) * link.alpha_s + 2 * (ranks - 1) / ranks * nbytes / link.beta_Bps


def allgather_seconds(link: Link, ranks: int, nbytes: float) -> float:
    """`nbytes`: the gathered result; each rank receives (n - 1) / n of it."""
    if ranks <= 1:
        return 0.0
    return math.ceil(math.log2(ranks)) * link.alpha_s + (ranks - 1) / ranks * nbytes / link.beta_Bps


@dataclass(frozen=True)
class Calibration:
    """Measured seconds of one whole decoder layer (tp = 1) by token count (rows x tokens) at `context`, and
    where the engine's own decode step was timed (time_engine_steps), the step's fixed part by token count:
    embedding, LM head, sampling and the host's scheduling and launches."""

    seconds_by_tokens: tuple[tuple[int, float], ...]
    context: int
    device: str
    mode: str = "eager"  # "cuda graph": replays of a captured layer, as Ferry's decode runs on GPUs
    fixed_by_tokens: tuple[tuple[int, float], ...] = ()
    # On a GPU, whose host prepares the next step while the GPU runs this one, a step takes the longer of the two:
    # the GPU's own fixed work (from graph replays, no host) and the shallow engine's whole step, a floor no
    # deeper step goes under (the host's work of a step, where that is what bounds it).
    gpu_fixed_by_tokens: tuple[tuple[int, float], ...] = ()
    host_floor_by_tokens: tuple[tuple[int, float], ...] = ()

    def layer_seconds(self, tokens: int) -> float:
        return _interpolate(self.seconds_by_tokens, tokens)

    def fixed_seconds(self, tokens: int) -> float | None:
        return _interpolate(self.fixed_by_tokens, tokens) if self.fixed_by_tokens else None

    def overlapped(self, tokens: int) -> tuple[float, float] | None:
        """(the GPU's fixed work, the host's floor) of a step, where the host's work overlaps the GPU's."""
        if not self.gpu_fixed_by_tokens:
            return None
        return _interpolate(self.gpu_fixed_by_tokens, tokens), _interpolate(self.host_floor_by_tokens, tokens)


def _interpolate(points: tuple[tuple[int, float], ...], tokens: int) -> float:
    """Linear between measured points; beyond them, the line through the last two (compute-bound prefill grows
    linearly in tokens), never below the smallest. The points are not made monotone: fewer rows can truly take
    longer (torch's fp32 matmul on a CPU runs 2 and 3 rows as that many matrix-vector products and 4 as one
    matrix product, faster than 3 on the 2-core machine), and time_engine_steps' interleaved runs keep noise small."""
    pts = sorted(points)
    if len(pts) == 1:
        return pts[0][1]
    i = next((k for k in range(1, len(pts)) if tokens <= pts[k][0]), len(pts) - 1)
    (n0, t0), (n1, t1) = pts[i - 1], pts[i]
    return max(t0 + (t1 - t0) * (tokens - n0) / (n1 - n0), min(t for _, t in pts))


def stage_terms(config: ModelConfig, shape: RankShape, device: Device, tp_link: Link | None, layers: int, rows: int,
                tokens: int, context: int, first: bool, last: bool, params: CostParams,
                calibration: Calibration | None = None) -> dict[str, float]:
    """Seconds of one stage forward for one micro-batch on one rank, by term (their sum is the stage's time)."""
    b, h, hd, tp = params.dtype_bytes, config.hidden_size, config.head_dim, shape.tp
    n = rows * tokens
    # Causal prefill: token i attends to i + 1 positions, context / 2 on average; decode attends to all of them.
    attended = context if tokens == 1 else (context + 1) / 2
    if calibration is not None:
        # The measured layer (tp = 1) is its weight read plus a floor of launches and latencies that does not
        # shrink with more ranks (at one token, what exceeds the weight read); the rest divides over the ranks.
        weights_s = shape.layer_params * tp * b / device.mem_bw_Bps
        floor = min(max(0.0, calibration.layer_seconds(1) - weights_s), calibration.layer_seconds(n))
        compute, kv = layers * (floor + (calibration.layer_seconds(n) - floor) / tp), 0.0
    else:
        flops = 2 * shape.layer_params * n + 4 * n * attended * shape.q_heads * hd
        compute = layers * max(shape.layer_params * b / device.mem_bw_Bps, flops / device.flops)
        kv = layers * rows * context * 2 * shape.kv_heads * hd * b / device.mem_bw_Bps
    tp_comm = 0.0
    if tp > 1:
        assert tp_link is not None, "a TP group of several ranks has a link"
        tp_comm = layers * 2 * allreduce_seconds(tp_link, tp, n * h * b)
    embed = head = 0.0
    head_read = max(shape.vocab_rows * h * b / device.mem_bw_Bps, 2 * rows * shape.vocab_rows * h / device.flops)
    if first:
        embed = n * h * b / device.mem_bw_Bps + (allreduce_seconds(tp_link, tp, n * h * b) if tp > 1 else 0.0)
    if last:  # only each sequence's last position reaches the LM head
        head = head_read + (allgather_seconds(tp_link, tp, rows * config.vocab_size * b) if tp > 1 else 0.0)
    overhead = params.step_overhead_s
    fixed = calibration.fixed_seconds(n) if calibration is not None else None
    overlapped = calibration.overlapped(n) if calibration is not None else None
    if overlapped is not None:
        fixed = overlapped[0]
    if fixed is not None:
        # The engine's measured fixed part holds the one-device LM head (and embedding): counted here instead of
        # the roofline's, so a stage without the head pays only the host's and the launches' share.
        head_at_tp1 = head_read * tp
        overhead = max(fixed - head_at_tp1, params.step_overhead_s)
        embed = allreduce_seconds(tp_link, tp, n * h * b) if first and tp > 1 else 0.0
        if last:
            head = min(head_at_tp1, fixed) / tp + (head - head_read)
    terms = {"compute": compute, "kv_read": kv, "tp_allreduce": tp_comm, "embed": embed, "lm_head": head,
             "overhead": overhead}
    if overlapped is not None and first and last:
        # One stage: its host schedules the next step under this one's GPU work, so a step takes the longer of the
        # two. (A pipeline's first stage waits for its tokens before it schedules: CostParams.pipeline_host_s.)
        terms["host_wait"] = max(0.0, overlapped[1] - sum(terms.values()))
    return terms


def stage_memory(config: ModelConfig, shape: RankShape, layers: int, first: bool, last: bool, pp: int,
                 kv_tokens: int, params: CostParams) -> dict[str, float]:
    """Bytes one rank of a stage holds: its weights, the KV cache of every sequence for its layers, a margin."""
    b, h = params.dtype_bytes, config.hidden_size
    weights = layers * shape.layer_params * b
    table = shape.vocab_rows * h * b
    if first:
        weights += table
    if last:  # a tied head shares the embedding table only when one stage holds both
        weights += h * b + (table if not (config.tie_word_embeddings and pp == 1) else 0)
    kv = kv_tokens * layers * 2 * shape.kv_heads * config.head_dim * b
    return {"weights": weights, "kv_cache": kv, "margin": params.activation_margin_bytes}


def time_engine_steps(config: ModelConfig, device, dtype, token_counts: tuple[int, ...] = (1, 8, 32, 64, 128),
                      new_tokens: int = 16, repeats: int = 3, slowdown: int = 1, prompt_len: int = 32) -> Calibration:
    """Ferry's own decode step on `device`, timed with two depths of `config`'s shape (random weights, the path a
    real run takes: paged attention, CUDA graphs on GPUs, the host's scheduling). Rows = each token count, each
    sequence `prompt_len` tokens of prompt (the workload's context). `slowdown`: the emulated slow device of a
    placement (placement.py).

    On a CPU, whose step is the sum of its parts, depths 1 and 3: a layer is half the difference of the two
    steps, the fixed part what the shallower leaves over. On a GPU the host schedules the next step while the GPU
    runs this one, and a shallow step is bound by the host (one layer of Llama-3-8B on the H200 at any batch, six
    at 64 rows), so differences of whole steps time layers faster than their weights can be read: there a layer
    is the difference of the two depths' captured steps replayed alone (GPU time, depths 2 and 6), the GPU's fixed
    work what the shallower graph leaves over, and the shallower whole step the host's floor (Calibration)."""
    import statistics
    from dataclasses import replace

    import torch

    from ferry.bench.decode_timing import ferry_decode, graph_step_ms
    from ferry.bench.shapes import random_model
    from ferry.engine.engine import Engine

    device = torch.device(device)
    kv = "2GiB" if device.type == "cuda" else "0.5GiB"
    shallow, deep = (1, 3) if device.type == "cpu" else (2, 6)
    engines = {}
    for layers in (shallow, deep):
        model = random_model(replace(config, num_layers=layers), device, dtype)
        model.emulate_slowdown(slowdown)
        engines[layers] = Engine(model, None, kv_memory=kv, max_running=max(token_counts))
    mode = "engine, " + engines[shallow].decode_path.split(",")[0]
    # The two engines take turns, so a change in the machine's load lands on both. A GPU's steps are tight and a
    # slow turn is a host hiccup: the fastest turn. A CPU's cores are shared with whatever else runs, in the real
    # run too: the median, the statistic benchmarks report (the fastest of five predicted every 2-core layout too
    # fast).
    pick = min if device.type == "cuda" else statistics.median
    layer, fixed, gpu_fixed, host_floor = [], [], [], []
    for n in token_counts:
        samples: dict[int, list[float]] = {shallow: [], deep: []}
        for _ in range(repeats):
            for layers, engine in engines.items():
                samples[layers].append(1.0 / ferry_decode(engine, n, prompt_len, new_tokens, config.vocab_size, 1))
        step = {layers: pick(samples[layers]) for layers in engines}
        graph = {layers: graph_step_ms(engine, n, prompt_len) for layers, engine in engines.items()}
        if None not in graph.values():  # captured (GPU): each depth's step replayed alone
            per_layer = max((graph[deep] - graph[shallow]) / 1e3 / (deep - shallow), 0.0)
            gpu_fixed.append((n, max(graph[shallow] / 1e3 - shallow * per_layer, 0.0)))
            host_floor.append((n, step[shallow]))
        else:
            per_layer = max((step[deep] - step[shallow]) / (deep - shallow), 0.0)
        layer.append((n, per_layer))
        fixed.append((n, max(step[shallow] - shallow * per_layer, 0.0)))
    del engines
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if gpu_fixed:
        mode += ", layers from graph replays"
    return Calibration(tuple(layer), prompt_len + new_tokens // 2, str(device), mode, tuple(fixed), tuple(gpu_fixed),
                       tuple(host_floor))


def time_pipeline_host(config: ModelConfig, dtype: str, batch: int, prompt_len: int, calibration: Calibration,
                       topology, new_tokens: int = 16, repeats: int = 3) -> tuple[float, dict]:
    """The pipeline's own cost per micro-batch on this machine's CPU ranks, measured: Ferry's pipeline engine run
    on two gloo ranks, one decoder layer each, two micro-batches sharing `batch` rows, against what the planner
    predicts for that run from `calibration` and `topology`'s link with no such term. What the measured cycle
    exceeds the prediction by, per micro-batch in flight (each stage's own scheduling of a micro-batch, the waits
    for hidden states and tokens that the link's fit does not see, two busy ranks sharing the machine), is
    CostParams.pipeline_host_s. Returns it and the run's figures."""
    from dataclasses import replace

    import torch

    from ferry.bench.pp_speed import LayoutJob, run_layout
    from ferry.parallel.planner import Layout, Workload, predict

    two = replace(config, num_layers=2)
    job = LayoutJob(two, dtype, tp=1, pp=2, batches=(batch,), prompt_len=prompt_len, new_tokens=new_tokens,
                    repeats=repeats, micro_batches=2, kv_memory="0.5GiB")
    measured = 1.0 / run_layout(job, "cpu")["rows"][0]["tokens_per_s"]
    params = CostParams(dtype_bytes=getattr(torch, dtype).itemsize, pipeline_host_s=0.0)
    model = predict(two, topology, Layout(1, 2, 2, (1, 1)), Workload(batch, prompt_len, new_tokens), params,
                    calibration).tpot_s
    in_flight = min(2, batch)
    return max(measured - model, 0.0) / in_flight, {"batch": batch, "measured_cycle_s": measured,
                                                    "modelled_cycle_s": model}
