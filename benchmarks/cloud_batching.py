"""The cloud's aggregate throughput and per-token latency with S concurrent edge sessions: batched steps over the
shared paged KV pool against the one-by-one path (each session's frames alone, its own dense cache).

    python benchmarks/cloud_batching.py [--sessions 1,2,4,8] [--tokens 16] [--split 1] [--windows auto,0,2]

Cloud and edges run in this process on loopback (no link emulator: the cloud's work is what is measured), the
edges as one thread each with the same --split; every session greedy-generates its own prompt, and every answer
is checked against `ferry generate`'s. Aggregate tokens/s = all sessions' tokens over the wall time from the
start gate to the last answer; TPOT = a session's decode time per token after its first, averaged over sessions.
`steps` counts forwards of the cloud's layers, `frames` the frames they served, `ms_per_step` the time in them
(one by one, steps of different sessions overlap on the cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.report import provenance, write_results
from ferry.edge.cloud import CloudLimits, CloudServer
from ferry.edge.cloud_batcher import CloudBatching
from ferry.edge.edge import EdgeClient
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.model.loader import load_model

TOKEN = "bench-" + os.urandom(6).hex()
PROMPTS = [
    "What is the capital of France?", "Write a short poem about rivers.", "Explain what a CPU cache is.",
    "Give three tips for learning a language.", "Describe a sunset over the sea.", "What is photosynthesis?",
    "List three prime numbers.", "Why is the sky blue?",
]


def run_sessions(loaded, server: CloudServer, split: int, prompts: list[list[int]], params: SamplingParams):
    """Every prompt on its own edge session at once (connected first, then released together)."""
    clients = [EdgeClient(loaded, [f"127.0.0.1:{server.port}"], split, TOKEN, timeout_s=300) for _ in prompts]
    for client in clients:
        client.connect()
    gate = threading.Barrier(len(prompts) + 1)
    results: list = [None] * len(prompts)

    def session(i: int) -> None:
        gate.wait(60)
        try:
            results[i] = clients[i].generate(prompts[i], params)[0]
        except Exception as exc:  # noqa: BLE001 - reported in the row
            results[i] = exc

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    before = (server.stats.steps, server.stats.frames, server.stats.busy_s)
    gate.wait(60)
    started = time.perf_counter()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - started
    for client in clients:
        client.close()
    return (results, wall, server.stats.steps - before[0], server.stats.frames - before[1],
            server.stats.busy_s - before[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,2,4,8", help="comma list of concurrent session counts")
    ap.add_argument("--tokens", type=int, default=16, help="tokens each session generates")
    ap.add_argument("--split", type=int, default=1, help="K: edges run layers 0..K-1, the cloud the rest")
    ap.add_argument("--windows", default="auto", help="comma list of batching windows to run the batched path at: "
                                                      "ms, or 'auto' (the cloud's default: a share of the last step)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads. 1 by default: on a shared 2-core machine two threads stall whenever "
                         "the other core is busy (a dense 29-layer SmolLM2 cloud step took 232 ms with 2 threads "
                         "under load vs 41.5 ms with 1), which would drown what is measured here")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(s) for s in args.sessions.split(",")]
    windows = [None if w == "auto" else float(w) for w in args.windows.split(",")]

    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine: these timings share its cores
    loaded = load_model(None, torch.device("cpu"), torch.float32, show_progress=False)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    prompts = [loaded.tokenizer.encode_chat(p) for p in PROMPTS]
    engine = Engine(loaded.model, loaded.tokenizer)
    reference = [engine.generate([ids], params)[0].token_ids for ids in prompts]

    paths = [("one-by-one", None, None)] + [("batched", w, CloudBatching(window_ms=w)) for w in windows]
    rows: list[dict] = []
    for path, window, batching in paths:
        server = CloudServer(loaded, args.split, TOKEN, CloudLimits(max_sessions=max(counts) + 4), batching)
        server.start("127.0.0.1:0")
        print(f"cloud: {server.path}", file=sys.stderr)
        try:
            run_sessions(loaded, server, args.split, prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
            for s in counts:
                chosen = [prompts[i % len(prompts)] for i in range(s)]
                results, wall, steps, frames, busy = run_sessions(loaded, server, args.split, chosen, params)
                done = [r for r in results if not isinstance(r, Exception)]
                tokens = sum(len(r.token_ids) for r in done)
                exact = sum(r.token_ids == reference[i % len(prompts)] for i, r in enumerate(results)
                            if not isinstance(r, Exception))
                rows.append({
                    "path": path, "window_ms": "auto" if batching and window is None else window, "sessions": s, "tokens": tokens,
                    "aggregate_tokens_per_s": round(tokens / wall, 2),
                    "tpot_ms": round(statistics.mean(1e3 / r.tokens_per_s for r in done if r.tokens_per_s), 1),
                    "ttft_ms": round(statistics.mean(r.ttft_s * 1e3 for r in done), 1),
                    "steps": steps, "frames": frames, "frames_per_step": round(frames / max(steps, 1), 2),
                    "ms_per_step": round(busy * 1e3 / max(steps, 1), 1),
                    "exact": f"{exact}/{s}", "errors": len(results) - len(done),
                })
                print(rows[-1], file=sys.stderr)
        finally:
            server.stop(0)
    for row in rows:  # against the one-by-one path at the same session count
        base = next(r for r in rows if r["path"] == "one-by-one" and r["sessions"] == row["sessions"])
        row["speedup_vs_one_by_one"] = round(row["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"], 2)

    meta = provenance(torch.device("cpu")) | {
        "model": loaded.path.name, "split": args.split, "tokens": args.tokens, "torch_threads": args.threads,
        "load_average_1min_at_start":
        load_at_start, "note": "cloud and edges share this process and the machine's cores; loopback gRPC"}
    cols = ["path", "window_ms", "sessions", "aggregate_tokens_per_s", "speedup_vs_one_by_one", "tpot_ms", "ttft_ms",
            "steps", "frames", "frames_per_step", "ms_per_step", "exact", "errors"]
    stem = f"{meta['date']}_cloud_batching_cpu"
    _, md_path = write_results(args.out, stem, meta, rows, cols)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
