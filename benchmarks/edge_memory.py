"""Peak resident memory of a split edge vs a whole-model process: how many edges fit on one machine.

Each row is its own `ferry` process on the same prompt; its peak RSS is the kernel's count for that process's
address space (VmHWM, reported by the process at exit: ferry/bench/process_memory.py), so nothing is estimated. A `ferry cloud` on loopback serves every split. Rows: `ferry generate` (the whole
model), `ferry edge --split K` for several K, `--fallback local` (reads the whole model), an edge refused by the
cloud before reading any weight (the floor: Python, torch, tokenizer, checkpoint header), and optionally the
same edge at an earlier commit (`--before COMMIT`, extracted with `git archive`).

    python benchmarks/edge_memory.py [--splits 1,4,15] [--before f5f34ed]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.process_memory import run_ferry  # noqa: E402
from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.parallel.launch import free_port  # noqa: E402

TOKEN = "mem-" + os.urandom(6).hex()
PROMPT = "What is the capital of France?"
ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], token: str = TOKEN, tree: Path = ROOT) -> dict:
    """One `ferry` process: its peak RSS (MiB), exit code, wall time and --json output (if any)."""
    env = {**os.environ, "FERRY_TOKEN": token, "PYTHONPATH": str(tree)}
    run = run_ferry(args, env=env, cwd=tree)
    doc = json.loads(run.stdout) if run.returncode == 0 and run.stdout.startswith("{") else None
    return {"peak_rss_mib": round(run.peak_rss_mib, 1), "exit": run.returncode, "wall_s": round(run.wall_s, 1),
            "json": doc, "error": run.stderr.strip().splitlines()[-1] if run.returncode else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", default="1,4,15")
    ap.add_argument("--before", default=None, help="also measure `ferry edge --split 4` at this commit")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    port = free_port()
    cloud = subprocess.Popen([sys.executable, "-m", "ferry.cli", "cloud", "--split", "1", "--listen",
                              f"127.0.0.1:{port}", "--device", "cpu"], env={**os.environ, "FERRY_TOKEN": TOKEN},
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and cloud.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    common = ["--chat", PROMPT, "--max-tokens", "16", "--device", "cpu", "--json"]
    edge = ["edge", "--cloud", f"127.0.0.1:{port}", *common]
    cases = [("ferry generate (whole model)", ["generate", *common], {})]
    cases += [(f"ferry edge --split {k}", [*edge, "--split", k], {}) for k in args.splits.split(",")]
    cases += [("ferry edge --split 4 --fallback local", [*edge, "--split", "4", "--fallback", "local"], {}),
              ("ferry edge --split 4, wrong token (refused before any weight: the floor)", [*edge, "--split", "4"],
               {"token": "wrong"})]
    rows = []
    try:
        with tempfile.TemporaryDirectory() as old:
            if args.before:
                archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True)
                subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
                cases.append((f"ferry edge --split 4 at {args.before} (before partial loading)",
                              [*edge, "--split", "4"], {"tree": Path(old)}))
            for name, argv, kw in cases:
                result = run(argv, **kw)
                link = (result["json"] or {}).get("completions", [{}])[0].get("link", {})
                rows.append({"process": name, "peak_rss_mib": result["peak_rss_mib"],
                             "reported_peak_rss_mib": link.get("peak_rss_mib", ""),
                             "weights_read": (result["json"] or {}).get("weights_read", ""),
                             "exit": result["exit"], "wall_s": result["wall_s"], "error": result["error"][:120]})
                print(f"{name:<72} {result['peak_rss_mib']:>8.1f} MiB  exit {result['exit']}", flush=True)
    finally:
        cloud.terminate()
        cloud.wait(60)
    full = rows[0]["peak_rss_mib"]
    floor = next(r["peak_rss_mib"] for r in rows if "floor" in r["process"])
    for r in rows:
        r["vs_whole_model"] = round(r["peak_rss_mib"] / full, 3)
        r["above_floor_vs_whole_model"] = round((r["peak_rss_mib"] - floor) / (full - floor), 3)
    meta = {**provenance(torch.device("cpu")), "prompt": PROMPT, "max_tokens": 16,
            "note": "peak RSS per process: VmHWM of its address space, reported at exit; fp32 SmolLM2-135M-Instruct "
                    "Q4_1 GGUF; the cloud runs in its own process and is not counted"}
    stem = f"{meta['date']}_edge_memory"
    columns = ["process", "peak_rss_mib", "vs_whole_model", "above_floor_vs_whole_model", "reported_peak_rss_mib",
               "weights_read", "exit", "wall_s"]
    notes = ("vs_whole_model: peak RSS / the `ferry generate` process's. above_floor_vs_whole_model: the same with the "
             "floor (an edge refused by the cloud before reading weights) subtracted from both: what the weights and "
             f"the run cost. The floor alone is {floor / full:.0%} of the whole-model process, so a split edge in one "
             "Python + torch process cannot go below that however few layers it holds.")
    json_path, md_path = write_results(args.out, stem, meta, rows, columns, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
