"""Split inference over an emulated WAN link (default 50 ms RTT, 20 Mbit/s): codecs, speculative rounds,
--split auto against an exhaustive sweep, and 50 concurrent sessions. Cloud and link emulator run as their own
`ferry cloud` / `ferry linkem` processes on loopback; this process is the edge.

    python benchmarks/edge_link.py [--rtt 50ms] [--rate 20mbit] [--tokens 32]
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
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

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
        for codec, drafter in variants:
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
        plain = next(r for r in rows if r["codec"] == "int8" and r["mode"] == "plain")["tokens_per_s"]
        spec = rows[-1]["tokens_per_s"]
        rows[-1]["speedup_vs_plain_int8"] = round(spec / plain, 2)

        # 2. --split auto against an exhaustive sweep (int8 codec)
        sweep_params = SamplingParams(max_tokens=16, ignore_eos=True)
        measured = {}
        for k in range(1, loaded.config.num_layers):
            completion, _, seconds, _ = run_edge(loaded, target, k, prompts[0], sweep_params, codec="int8")
            measured[k] = seconds / len(completion.token_ids)
        _, _, _, auto_client = run_edge(loaded, target, None, prompts[0], sweep_params, codec="int8")
        best_k = min(measured, key=measured.get)
        chosen = auto_client.split
        rows.append({
            "test": "split auto", "codec": "int8", "mode": "auto", "split": chosen,
            "tokens_per_s": round(1 / measured[chosen], 2), "best_split_measured": best_k,
            "best_tokens_per_s": round(1 / measured[best_k], 2),
            "auto_vs_best_time": round(measured[chosen] / measured[best_k], 3),
            "predicted_ms_per_token": round(auto_client.split_table[0]["predicted_s"] * 1e3, 1),
            "measured_ms_per_token_all_k": {k: round(v * 1e3, 1) for k, v in measured.items()},
        })
        print(rows[-1], file=sys.stderr)

        # 3. concurrent sessions: every answer must be its own prompt's exact tokens
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
                                               "note": "edge, cloud and link emulator share the 2-core machine"}
    cols = ["test", "codec", "mode", "split", "tokens_per_s", "bytes_sent_per_token (incl. prefill)", "exact_prompts",
            "acceptance_rate", "link_time_share", "speedup_vs_plain_int8", "best_split_measured", "auto_vs_best_time",
            "sessions", "completed_exact", "errors"]
    json_path, md_path = write_results(args.out, f"{meta['date']}_edge_link", meta, rows, cols)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
