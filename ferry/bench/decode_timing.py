"""Timing pieces shared by the decode benchmarks: copy bandwidth (the roofline's denominator), random prompts,
Ferry decode tokens/s, and the GPU time of one captured decode step."""

from __future__ import annotations

import statistics
import time

import torch

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-memory copy, counting bytes read plus bytes written: the best of 10 runs, since
    the roofline is a ceiling (on the shared 2-core VM single runs dip well below it)."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    del src, dst
    return 2 * n * 4 / min(times)


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (batch, length), generator=gen).tolist()


def ferry_decode(engine: Engine, batch: int, prompt_len: int, new_tokens: int, vocab: int, repeats: int) -> float:
    """Median per-sequence decode tokens/s over `repeats` runs, after one warm-up run (graph capture)."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    prompts = random_prompts(batch, prompt_len, vocab, seed=batch)
    engine.generate(prompts, params)
    rates = [statistics.median(c.tokens_per_s for c in engine.generate(prompts, params)) for _ in range(repeats)]
    return statistics.median(rates)


def captured_step(engine: Engine, batch: int, context: int):
    """The CUDA graph the engine replays for this batch and context (None if none was captured). The serving
    engine's graphs are per batch bucket (attention reads each sequence's own length); the static engine's per
    batch and context bucket."""
    if engine.graphs is None:
        return None
    from ferry.engine.cuda_graphs import batch_bucket, context_bucket

    if isinstance(engine, Engine):
        return engine.graphs.graphs.get(batch_bucket(batch))
    return engine.graphs.graphs.get((batch_bucket(batch), context_bucket(context, engine.cache.max_len)))


def graph_step_ms(engine: Engine, batch: int, context: int) -> float | None:
    """GPU time of one captured decode step alone (median of 50 back-to-back replays), host loop excluded."""
    step = captured_step(engine, batch, context)
    if step is None:
        return None
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


COMMUNICATION_KERNELS = ("nccl", "all_reduce", "allreduce", "one_shot", "two_shot", "symm")
FERRY_FUSED_KERNELS = ("add_rmsnorm", "silu_mul", "rotary_kv_write")


def kernel_family(name: str) -> str:
    """The kind of work a GPU kernel of a decode step does, from its name."""
    n = name.lower()
    if any(k in n for k in COMMUNICATION_KERNELS):
        return "all-reduce"  # the fused all-reduce + add + RMSNorm counts here: its time is mostly the link
    if any(k in n for k in ("gemv", "gemm", "sm90", "cutlass", "nvjet", "triton_tem", "splitk")):
        return "matmul"
    if any(k in n for k in ("fmha", "attention", "flash", "sdpa", "paged_decode")):
        return "attention"
    if any(k in n for k in FERRY_FUSED_KERNELS):
        return "ferry fused elementwise"
    if "triton" in n:
        return "fused elementwise (triton)"
    if "memset" in n or "memcpy" in n:
        return "memset/memcpy"
    return "other eager kernels"


def step_profile(graph, replays: int = 10) -> dict:
    """Per-step GPU microseconds and kernel counts by family, over `replays` replays of a captured step."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0:
            us[kernel_family(event.key)] += event.self_device_time_total / replays
            count[kernel_family(event.key)] += event.count // replays
    return {"kernels_per_step": sum(count.values()), "busy_us": round(sum(us.values()), 1),
            "families": {k: {"us": round(v, 1), "kernels": count[k]} for k, v in sorted(us.items(), key=lambda kv: -kv[1])}}


def communication_share(profile: dict) -> float | None:
    """Share of a profiled step's GPU kernel time (step_profile) spent in all-reduce kernels."""
    all_reduce = profile["families"].get("all-reduce", {"us": 0.0})["us"]
    return all_reduce / profile["busy_us"] if profile["busy_us"] else None
