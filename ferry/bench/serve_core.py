"""`ferry bench serve-core`: what continuous batching over the paged cache buys, measured side by side.

Four measurements on one loaded model:
- continuous vs static: an offline workload of N requests (fixed seed; prompt lengths uniform, output lengths
  log-uniform over their range, as chat answers are mostly short with a long tail) run by the serving engine with
  at most C sequences at once, and by the static-batch engine in batches of C (each batch decodes until its
  longest request ends). Output tokens/s and each request's latency (arrival to its last token).
- decode roofline: C requests prefilled, then decode-only steps timed; bytes each step must read (weights + every
  sequence's K/V) over the device's copy bandwidth, measured in the same run.
- batch 1: one sequence's decode tokens/s, paged engine vs the static engine's dense cache, interleaved runs.
- prefix reuse: time to first token of a request whose long prefix is cached, vs one whose prefix is new.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from ferry.bench.decode_timing import copy_bandwidth, sync
from ferry.bench.shapes import weight_bytes_per_token
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.engine.static_engine import StaticBatchEngine


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @classmethod
    def make(cls, n: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int], vocab: int,
             seed: int = 0, tokens_seed: int | None = None) -> Workload:
        """Lengths from `seed`; the prompts' token ids from `tokens_seed` when given (the same lengths with new
        text: a round that repeated the last round's prompts would find them in the prefix cache)."""
        gen = torch.Generator().manual_seed(seed)
        lens = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (n,), generator=gen).tolist()
        prompts = [torch.randint(100, min(vocab, 30000), (k,), generator=gen).tolist() for k in lens]
        lo, hi = math.log(output_lens[0]), math.log(output_lens[1])
        outs = [round(math.exp(lo + (hi - lo) * u)) for u in torch.rand(n, generator=gen).tolist()]
        if tokens_seed is not None:  # drawn after the lengths, so every tokens_seed has the same lengths
            text = torch.Generator().manual_seed(tokens_seed)
            prompts = [torch.randint(100, min(vocab, 30000), (k,), generator=text).tolist() for k in lens]
        return cls(prompts, outs)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    def add_to(self, engine: Engine) -> list[int]:
        """Queue every request (greedy, each to its own max_tokens); their ids in workload order."""
        return [engine.add_request(p, SamplingParams(max_tokens=m, ignore_eos=True))
                for p, m in zip(self.prompts, self.max_tokens, strict=True)]


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": ordered[len(ordered) // 2], "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def run_continuous(engine: Engine, work: Workload) -> dict:
    """Every request arrives at t=0; the engine runs them at most `max_running` at a time."""
    started = time.perf_counter()
    ids = work.add_to(engine)
    index = {rid: i for i, rid in enumerate(ids)}
    first, last = {}, {}
    # Where the time goes: each step() call's wall time by the kind of step it launched (with async readback it
    # also holds the wait for the previous step's tokens).
    kinds: dict[str, list[float]] = {"graph": [], "prefill-graph": [], "eager": [], "none": []}
    while engine.has_unfinished():
        stats = engine.stats
        graphs, prefill_graphs, steps, t0 = stats.graph_steps, stats.prefill_graph_steps, stats.steps, time.perf_counter()
        events = engine.step()
        kind = ("none" if stats.steps == steps else "graph" if stats.graph_steps > graphs
                else "prefill-graph" if stats.prefill_graph_steps > prefill_graphs else "eager")
        kinds[kind].append(time.perf_counter() - t0)
        for event in events:
            now = time.perf_counter() - started
            first.setdefault(index[event.index], now)
            if event.finish_reason:
                last[index[event.index]] = now
    wall = time.perf_counter() - started
    engine.check_no_leaks()
    out = _summary("continuous (paged)", work, wall, first, last)
    out["steps"] = {k: {"count": len(v), "total_s": round(sum(v), 3),
                        "median_ms": round(statistics.median(v) * 1e3, 3) if v else None} for k, v in kinds.items()}
    return out


def run_static(engine: StaticBatchEngine, work: Workload, batch: int) -> dict:
    """Batches of `batch` requests in arrival order; a batch decodes until its longest member's max_tokens, and a
    request counts as done at its own max_tokens-th token."""
    started = time.perf_counter()
    first, last = {}, {}
    for at in range(0, len(work.prompts), batch):
        prompts, limits = work.prompts[at : at + batch], work.max_tokens[at : at + batch]
        counts = [0] * len(prompts)

        def on_token(event, at=at, limits=limits, counts=counts):
            now = time.perf_counter() - started
            counts[event.index] += 1
            first.setdefault(at + event.index, now)
            if counts[event.index] == limits[event.index]:
                last[at + event.index] = now

        engine.generate(prompts, SamplingParams(max_tokens=max(limits), ignore_eos=True), on_token=on_token)
    wall = time.perf_counter() - started
    return _summary(f"static batches of {batch}", work, wall, first, last)


def _summary(name: str, work: Workload, wall: float, first: dict, last: dict) -> dict:
    return {"engine": name, "requests": len(work.prompts), "output_tokens": work.output_tokens, "wall_s": wall,
            "output_tokens_per_s": work.output_tokens / wall,
            **{f"latency_{k}_s": v for k, v in _percentiles(list(last.values())).items()},
            **{f"ttft_{k}_s": v for k, v in _percentiles(list(first.values())).items()},
            "latencies_s": [last[i] for i in sorted(last)]}


def decode_roofline(engine: Engine, work: Workload, steps: int = 64) -> dict:
    """All of `work` (at most max_running requests, outputs longer than `steps`) prefilled, then `steps`
    decode-only steps timed; each step must read every weight once and every running sequence's K/V."""
    device = engine.device
    ids = work.add_to(engine)
    while any(r.computed < len(r.token_ids) for r in map(engine.request, ids)):
        engine.step()
    engine.step()  # the first all-decode step (captures its graph bucket on first use)
    weights = weight_bytes_per_token(engine.model)
    kv_tokens = 0
    graph_steps = engine.stats.graph_steps
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        kv_tokens += sum(r.computed + 1 for r in engine.scheduler.running)
        engine.step()
    sync(device)
    elapsed = time.perf_counter() - started
    graph_steps = engine.stats.graph_steps - graph_steps
    for rid in ids:
        engine.abort(rid)
    engine.check_no_leaks()
    bandwidth = copy_bandwidth(device)
    read = steps * weights + kv_tokens * engine.cache.bytes_per_token
    return {"batch": len(ids), "steps": steps, "graph_steps": graph_steps, "step_ms": elapsed / steps * 1e3,
            "decode_tokens_per_s": len(ids) * steps / elapsed, "bytes_per_step_gb": read / steps / 1e9,
            "kv_share_of_bytes": kv_tokens * engine.cache.bytes_per_token / read,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "of_roofline": read / bandwidth / elapsed}


def batch1(paged: Engine, static: StaticBatchEngine, prompt: list[int], new_tokens: int, repeats: int = 3) -> dict:
    """One sequence's decode tokens/s on each engine, alternating runs (after one warm-up each), medians."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    rates: dict[str, list[float]] = {"paged": [], "dense": []}
    for name, engine in (("paged", paged), ("dense", static)):
        engine.generate([prompt], params)
    for _ in range(repeats):
        for name, engine in (("paged", paged), ("dense", static)):
            rates[name].append(engine.generate([prompt], params)[0].tokens_per_s)
    paged_rate, dense_rate = statistics.median(rates["paged"]), statistics.median(rates["dense"])
    return {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "paged_tokens_per_s": paged_rate,
            "dense_tokens_per_s": dense_rate, "paged_vs_dense": paged_rate / dense_rate,
            "paged_path": paged.decode_path, "dense_path": static.decode_path}


def prefix_ttft(engine: Engine, prefix_len: int, suffix_len: int, vocab: int, repeats: int = 3) -> dict:
    """Time to first token with a `prefix_len`-token prefix already cached (another request used it) vs new."""
    gen = torch.Generator().manual_seed(1234)

    def tokens(n: int) -> list[int]:
        return torch.randint(100, min(vocab, 30000), (n,), generator=gen).tolist()

    one = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.generate([tokens(prefix_len + suffix_len)], one)  # warm-up: kernels, graph buckets
    cold, warm, hits = [], [], []
    for _ in range(repeats):
        prefix = tokens(prefix_len)
        cold.append(engine.generate([prefix + tokens(suffix_len)], one)[0].ttft_s)
        before = engine.blocks.stats.prefix_hit_tokens
        warm.append(engine.generate([prefix + tokens(suffix_len)], one)[0].ttft_s)
        hits.append(engine.blocks.stats.prefix_hit_tokens - before)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    return {"prefix_tokens": prefix_len, "suffix_tokens": suffix_len, "cold_ttft_ms": cold_s * 1e3,
            "cached_ttft_ms": warm_s * 1e3, "speedup": cold_s / warm_s, "prefix_hit_tokens": min(hits)}


def plot(continuous: dict, static: dict, latencies: dict[str, list[float]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [continuous["engine"], static["engine"]]
    a.bar(names, [continuous["output_tokens_per_s"], static["output_tokens_per_s"]], color=["tab:blue", "tab:gray"])
    a.set_ylabel("output tokens/s")
    a.set_title("throughput, same workload")
    for name, values in latencies.items():
        ordered = sorted(values)
        b.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    b.set_xlabel("request latency, s (arrival to last token)")
    b.set_ylabel("fraction of requests")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _median_round(rows: list[dict]) -> dict:
    """The round whose output tokens/s is the median (the lower middle one of an even count)."""
    return sorted(rows, key=lambda r: r["output_tokens_per_s"])[(len(rows) - 1) // 2]


def run_serve_core_bench(model, tokenizer, label: str, n: int, concurrency: int, prompt_lens: tuple[int, int],
                         output_lens: tuple[int, int], prefix_len: int, kv_memory: str | None, parts: list[str],
                         out_dir, log=print, compile: bool = False, rounds: int = 1) -> str:
    """Run the asked `parts` (continuous, roofline, batch1, prefix) on `model`; write JSON, markdown and PNG.
    `rounds`: the continuous part runs both engines that many times, alternated (a shared CPU moves from one run to
    the next by 20%); the table shows each engine's median round, the ratio is of the medians."""
    from ferry.bench.report import markdown_table, provenance, write_results

    device = model.norm.weight.device
    vocab = model.config.vocab_size
    engine = Engine(model, None, kv_memory=kv_memory, max_running=concurrency, compile=compile)
    log(f"serving engine: decode {engine.decode_path}; prefill {engine.prefill_path}; KV cache {engine.kv_report}")
    static = StaticBatchEngine(model, None)
    # What a server does at start: every decode bucket captured (compiled: only the full batch's, a compile each),
    # and the static engine's buckets for these lengths, so no capture lands inside a timed run.
    engine.warm_up(batch=concurrency, every_bucket=not compile)
    if static.graphs is not None:
        from ferry.engine.cuda_graphs import batch_bucket, context_bucket

        longest = prompt_lens[1] + output_lens[1]
        static.cache.ensure(batch_bucket(concurrency), longest)
        context = context_bucket(1, longest)
        while True:
            static.graphs.capture(batch_bucket(concurrency), min(context, static.cache.max_len))
            if context >= longest:
                break
            context *= 2
    meta = provenance(device) | {"model": label, "dtype": str(engine.dtype).removeprefix("torch."),
                                 "kv_cache": engine.kv_report, "decode_path": engine.decode_path,
                                 "prefill_path": engine.prefill_path}
    sections, rows = [], []
    if "continuous" in parts:
        warm = Workload.make(concurrency, prompt_lens, (4, 8), vocab, seed=1)  # graph buckets, kernels, allocator
        run_continuous(engine, warm)
        run_static(static, warm, concurrency)
        runs = []
        for round_ in range(rounds):
            # Every round the same lengths with new prompt text, so no round finds the last one's prompts in the
            # prefix cache (the static engine has none); both engines run the same prompts within a round.
            work = Workload.make(n, prompt_lens, output_lens, vocab, tokens_seed=None if round_ == 0 else 1000 + round_)
            runs.append((run_continuous(engine, work), run_static(static, work, concurrency)))
            if rounds > 1:
                log(f"round {round_}: continuous {runs[-1][0]['output_tokens_per_s']:.1f}, static "
                    f"{runs[-1][1]['output_tokens_per_s']:.1f} output tokens/s")
        cont, stat = (_median_round([r[i] for r in runs]) for i in (0, 1))
        meta["workload"] = {"requests": n, "concurrency": concurrency, "prompt_lens": list(prompt_lens),
                            "output_lens": list(output_lens), "output_lens_distribution": "log-uniform", "seed": 0}
        meta["continuous_vs_static"] = cont["output_tokens_per_s"] / stat["output_tokens_per_s"]
        meta["rounds"] = rounds
        meta["round_ratios"] = [round(c["output_tokens_per_s"] / s["output_tokens_per_s"], 3) for c, s in runs]
        latencies = {r["engine"]: r.pop("latencies_s") for r in (cont, stat)}
        meta["continuous_steps"] = cont.pop("steps")
        # No full block is shared between rounds; a few single tokens may still match as copy-on-write starts.
        meta["prefix_hit_tokens"] = engine.blocks.stats.prefix_hit_tokens
        log(f"continuous steps by kind: {meta['continuous_steps']}; prefix-cache hits: {meta['prefix_hit_tokens']}")
        rows += [cont, stat]
        cols = ["engine", "requests", "output_tokens", "wall_s", "output_tokens_per_s", "latency_p50_s",
                "latency_p90_s", "ttft_p50_s", "ttft_p90_s"]
        sections.append(f"## Continuous vs static batching ({meta['continuous_vs_static']:.2f}x)\n\n"
                        + markdown_table([cont, stat], cols))
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            plot(cont, stat, latencies, out_dir / f"{meta['date']}_serve_core_{label}.png")
        except ImportError:
            log("matplotlib not installed; no PNG written")
        log(sections[-1])
    if "roofline" in parts:
        work = Workload.make(concurrency, prompt_lens, (max(output_lens[0], 80), output_lens[1]), vocab, seed=2)
        meta["decode_roofline"] = decode_roofline(engine, work)
        sections.append("## Aggregate decode vs the memory roofline\n\n" + markdown_table(
            [meta["decode_roofline"]], list(meta["decode_roofline"])))
        log(sections[-1])
    if "batch1" in parts:
        prompt = Workload.make(1, (128, 128), (1, 1), vocab, seed=3).prompts[0]
        meta["batch1"] = batch1(engine, static, prompt, new_tokens=256 if device.type == "cuda" else 64)
        sections.append("## Batch 1: paged vs dense cache\n\n" + markdown_table([meta["batch1"]], list(meta["batch1"])))
        log(sections[-1])
    if "prefix" in parts:
        meta["prefix_reuse"] = prefix_ttft(engine, prefix_len, 32, vocab)
        sections.append("## Prefix reuse: time to first token\n\n" + markdown_table(
            [meta["prefix_reuse"]], list(meta["prefix_reuse"])))
        log(sections[-1])
    stem = f"{meta['date']}_serve_core_{label}" + ("_compiled" if compile else "")
    cols = ["engine", "requests", "output_tokens", "wall_s", "output_tokens_per_s", "latency_p50_s", "latency_p90_s"]
    json_path, md_path = write_results(out_dir, stem, meta, rows, cols, notes="\n\n".join(sections))
    return f"wrote {json_path}, {md_path}"
