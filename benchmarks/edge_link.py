"""Split inference over an emulated WAN link (default 50 ms RTT, 20 Mbit/s): codecs, speculative rounds with a
good and a deliberately wrong draft, --split auto against a sweep of fixed K, and 50 concurrent sessions. Cloud
and link emulator run as their own `ferry cloud` / `ferry linkem` processes on loopback; this process is the edge.

    python benchmarks/edge_link.py [--rtt 50ms] [--rate 20mbit] [--tokens 32] [--parts codecs,draft,auto,sessions]

The --split auto row times the auto runs themselves (connect, PING probes, both sides' compute measurements,
then generation), not the sweep's time at the K they chose; the sweep's figures are beside it for comparison.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.poor_draft import WrongDrafter  # noqa: E402
from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.edge.edge import EdgeClient  # noqa: E402
from ferry.edge.speculative import Drafter  # noqa: E402
from ferry.engine.engine import Engine  # noqa: E402
from ferry.engine.sampling import SamplingParams  # noqa: E402
from ferry.model.loader import load_model  # noqa: E402
from ferry.parallel.launch import free_port  # noqa: E402

TOKEN = "bench-" + os.urandom(6).hex()
PROMPTS = [
    "What is the capital of France?", "Write a short poem about rivers.", "Explain what a CPU cache is.",
    "Give three tips for learning a language.", "Describe a sunset over the sea.", "What is photosynthesis?",
]


def wait_port(port: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} never opened")


def spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "FERRY_TOKEN": TOKEN}
    return subprocess.Popen([sys.executable, "-m", "ferry.cli", *args], env=env, stderr=subprocess.PIPE, text=True)


def run_edge(loaded, target, split, ids, params, **kw):
    client = EdgeClient(loaded, [target], split, TOKEN, timeout_s=120, **kw)
    try:
        started = time.perf_counter()
        completion, stats = client.generate(ids, params)
        return completion, stats, time.perf_counter() - started, client
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt", default="50ms")
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--split", type=int, default=15)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--parts", default="codecs,draft,auto,sessions",
                    help="comma list of: codecs (plain split per codec + speculative), draft (plain vs a good and "
                         "a wrong draft), auto (--split auto vs fixed K), sessions (concurrent sessions)")
    ap.add_argument("--sweep", default="all", help="the fixed K the auto runs are compared with: 'all' or a comma list")
    ap.add_argument("--auto-runs", type=int, default=3, help="--split auto requests (each probes afresh)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"codecs", "draft", "auto", "sessions"}:
        ap.error(f"unknown parts: {sorted(parts - {'codecs', 'draft', 'auto', 'sessions'})}")

    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine: these timings share its cores
    cloud_port, link_port = free_port(), free_port()
    cloud = spawn("cloud", "--split", "1", "--listen", f"127.0.0.1:{cloud_port}", "--device", "cpu",
                  "--max-sessions", str(args.sessions + 8))
    linkem = spawn("linkem", "--listen", f"127.0.0.1:{link_port}", "--to", f"127.0.0.1:{cloud_port}",
                   "--rtt", args.rtt, "--rate", args.rate)
    rows: list[dict] = []
    try:
        wait_port(cloud_port, cloud)
        wait_port(link_port, linkem)
        target = f"127.0.0.1:{link_port}"
        loaded = load_model(None, torch.device("cpu"), torch.float32, show_progress=False)
        draft = Drafter(load_model(None, torch.device("cpu"), torch.bfloat16, show_progress=False, weights="int8"))
        params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
        prompts = [loaded.tokenizer.encode_chat(p) for p in PROMPTS]
        engine = Engine(loaded.model, loaded.tokenizer)
        reference = [engine.generate([ids], params)[0].token_ids for ids in prompts]

        # 1. plain split per codec, then speculative rounds (same prompts, same split)
        variants = [("fp32", None), ("fp16", None), ("int8", None), ("int8+zstd", None), ("int4", None), ("int8", draft)]
        for codec, drafter in variants if "codecs" in parts else []:
            rates, sent, exact, drafted, accepted, shares = [], [], 0, 0, 0, []
            for ids, ref in zip(prompts[:3], reference[:3], strict=True):
                completion, stats, seconds, _ = run_edge(loaded, target, args.split, ids, params, codec=codec,
                                                         drafter=drafter, gamma_max=12)
                rates.append(len(completion.token_ids) / seconds)
                sent.append(stats.bytes_sent / len(completion.token_ids))  # prefill frame included
                exact += completion.token_ids == ref
                drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
                shares.append(stats.as_dict(len(completion.token_ids))["link_time_share"])
            rows.append({
                "test": "split decode", "codec": codec, "mode": "speculative (int8 draft)" if drafter else "plain",
                "split": args.split, "tokens_per_s": round(statistics.median(rates), 2),
                "bytes_sent_per_token (incl. prefill)": round(statistics.median(sent), 1), "exact_prompts": f"{exact}/3",
                "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                "link_time_share": round(statistics.median(shares), 3),
            })
            print(rows[-1], file=sys.stderr)
        if "codecs" in parts:
            plain = next(r for r in rows if r["codec"] == "int8" and r["mode"] == "plain")["tokens_per_s"]
            rows[-1]["speedup_vs_plain_int8"] = round(rows[-1]["tokens_per_s"] / plain, 2)

        # 2. plain split vs speculative rounds with the int8 draft and with a draft that is (almost) never right
        drafts = [("plain", None), ("speculative (int8 draft)", draft),
                  ("speculative (wrong draft)", WrongDrafter(draft.loaded))]
        plain_rate = None
        for mode, drafter in drafts if "draft" in parts else []:
            rates, drafted, accepted, rounds, undrafted, exact = [], 0, 0, 0, 0, 0
            for ids, ref in zip(prompts[:3], reference[:3], strict=True):
                completion, stats, seconds, _ = run_edge(loaded, target, args.split, ids, params, codec="int8",
                                                         drafter=drafter, gamma_max=12)
                rates.append(len(completion.token_ids) / seconds)
                exact += completion.token_ids == ref
                drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
                rounds, undrafted = rounds + stats.draft_rounds, undrafted + stats.undrafted_steps
            rate = statistics.median(rates)
            plain_rate = plain_rate or rate
            rows.append({
                "test": "draft quality", "codec": "int8", "mode": mode, "split": args.split,
                "tokens_per_s": round(rate, 2), "exact_prompts": f"{exact}/3", "speedup_vs_plain_int8":
                round(rate / plain_rate, 2), "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                "draft_rounds": rounds, "undrafted_steps": undrafted,
            })
            print(rows[-1], file=sys.stderr)

        # 3. --split auto, timed as run (probing included), against fixed K (int8 codec)
        if "auto" in parts:
            sweep_params = SamplingParams(max_tokens=16, ignore_eos=True)
            ks = range(1, loaded.config.num_layers) if args.sweep == "all" else [int(k) for k in args.sweep.split(",")]
            measured = {}
            for k in ks:
                completion, _, seconds, _ = run_edge(loaded, target, k, prompts[0], sweep_params, codec="int8")
                measured[k] = seconds / len(completion.token_ids)
            own, chosen, predicted = [], [], []
            for _ in range(args.auto_runs):
                completion, _, seconds, auto_client = run_edge(loaded, target, None, prompts[0], sweep_params,
                                                               codec="int8")
                own.append(seconds / len(completion.token_ids))
                chosen.append(auto_client.split)
                predicted.append(auto_client.split_table[0]["predicted_s"])
            best_k = min(measured, key=measured.get)
            auto_s = statistics.median(own)
            rows.append({
                "test": "split auto", "codec": "int8", "mode": "auto (probing included)",
                "split": ",".join(map(str, chosen)), "tokens_per_s": round(1 / auto_s, 2),
                "auto_ms_per_token": round(auto_s * 1e3, 1),
                "auto_ms_per_token_runs": [round(t * 1e3, 1) for t in own],
                "predicted_ms_per_token": [round(t * 1e3, 1) for t in predicted],
                "best_split_measured": best_k, "best_ms_per_token": round(measured[best_k] * 1e3, 1),
                "auto_vs_best_time": round(auto_s / measured[best_k], 3),
                "fixed_ms_per_token_by_k": {k: round(v * 1e3, 1) for k, v in measured.items()},
            })
            print(rows[-1], file=sys.stderr)

        # 4. concurrent sessions: every answer must be its own prompt's exact tokens
        if "sessions" in parts:
            conc_params = SamplingParams(max_tokens=8, ignore_eos=True)
            conc_ref = [engine.generate([ids], conc_params)[0].token_ids for ids in prompts]
            results: dict[int, bool] = {}
            errors: list[str] = []

            def session(i: int) -> None:
                try:
                    completion, *_ = run_edge(loaded, target, args.split, prompts[i % len(prompts)], conc_params, codec="int8")
                    results[i] = completion.token_ids == conc_ref[i % len(prompts)]
                except Exception as exc:  # counted as a failed session
                    errors.append(f"{i}: {exc}")

            started = time.perf_counter()
            threads = [threading.Thread(target=session, args=(i,)) for i in range(args.sessions)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            rows.append({
                "test": "concurrent sessions", "codec": "int8", "mode": "plain", "split": args.split,
                "sessions": args.sessions, "completed_exact": sum(results.values()), "errors": len(errors),
                "wall_s": round(time.perf_counter() - started, 1),
            })
            print(rows[-1], errors[:3], file=sys.stderr)
    finally:
        for proc in (linkem, cloud):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    meta = provenance(torch.device("cpu")) | {"rtt": args.rtt, "rate": args.rate, "tokens": args.tokens,
                                               "parts": args.parts, "sweep": args.sweep, "auto_runs": args.auto_runs,
                                               "load_average_1min_at_start": load_at_start,
                                               "note": "edge, cloud and link emulator share the 2-core machine"}
    cols = ["test", "codec", "mode", "split", "tokens_per_s", "bytes_sent_per_token (incl. prefill)", "exact_prompts",
            "acceptance_rate", "draft_rounds", "undrafted_steps", "link_time_share", "speedup_vs_plain_int8",
            "auto_ms_per_token", "best_split_measured", "best_ms_per_token", "auto_vs_best_time",
            "sessions", "completed_exact", "errors"]
    cols = [c for c in cols if any(c in r for r in rows)]
    # a run of some parts only gets its own file, so it never reads as the full benchmark
    every = {"codecs", "draft", "auto", "sessions"}
    stem = f"{meta['date']}_edge_link" + ("" if parts == every else "_" + "-".join(sorted(parts)))
    json_path, md_path = write_results(args.out, stem, meta, rows, cols)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
