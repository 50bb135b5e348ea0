"""Peak resident memory of a split edge vs a whole-model process: how many edges fit on one machine.

Each row is its own process on the same prompt; its peak RSS is the kernel's count for that process's address
space (VmHWM, reported by the process at exit: ferry/bench/process_memory.py), so nothing is estimated; each is
run `--repeats` times and the median kept (malloc's arenas made single runs differ by ~25 MiB). A `ferry cloud`
on loopback serves every split. Rows: Python with torch imported and nothing else; `ferry generate` (the whole
model) reading the packed-weight cache, as every run after a machine's first does, and that first run itself,
which converts the GGUF (an empty cache folder); `ferry edge --split K` for several K; `--fallback local` (reads
the whole model); an edge refused by the cloud before reading any weight (the floor: Python, torch, tokenizer,
checkpoint header); and optionally the same edge at an earlier commit (`--before COMMIT`, via `git archive`).

    python benchmarks/edge_memory.py [--splits 1,4,15] [--repeats 3] [--before f5f34ed]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.process_memory import run_ferry
from ferry.bench.report import provenance, write_results
from ferry.memory import vmhwm_mib
from ferry.parallel.launch import free_port

TOKEN = "mem-" + os.urandom(6).hex()
PROMPT = "What is the capital of France?"
ROOT = Path(__file__).resolve().parents[1]


WHOLE = "ferry generate (whole model, packed cache)"
FIRST_LOAD = "ferry generate (whole model, first load: converts the GGUF)"
TORCH = "python + torch (import torch, nothing else)"
FLOOR = "ferry edge --split 4, wrong token (refused before any weight: the floor)"


def run(args: list[str], repeats: int, token: str = TOKEN, tree: Path = ROOT, env: dict | None = None) -> dict:
    """One `ferry` command, `repeats` processes: the median peak RSS (MiB) and its range, the last one's exit code,
    wall time and --json output (if any)."""
    env = {**os.environ, "FERRY_TOKEN": token, "PYTHONPATH": str(tree), **(env or {})}
    runs = [run_ferry(args, env=env, cwd=tree) for _ in range(repeats)]
    last = runs[-1]
    peaks = [r.peak_rss_mib for r in runs]
    doc = json.loads(last.stdout) if last.returncode == 0 and last.stdout.startswith("{") else None
    return {"peak_rss_mib": round(statistics.median(peaks), 1), "peak_range_mib": f"{min(peaks):.0f}-{max(peaks):.0f}",
            "exit": last.returncode, "wall_s": round(last.wall_s, 1), "json": doc,
            "error": last.stderr.strip().splitlines()[-1] if last.returncode else ""}


def torch_floor(repeats: int) -> dict:
    """A Python process that imports torch and exits: what any Python + torch edge holds before its first line."""
    code = "import torch\nprint(open('/proc/self/status').read())"
    peaks = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        peaks.append(vmhwm_mib(out))
    return {"peak_rss_mib": round(statistics.median(peaks), 1), "peak_range_mib": f"{min(peaks):.0f}-{max(peaks):.0f}",
            "exit": 0, "wall_s": "", "json": None, "error": ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", default="1,4,15")
    ap.add_argument("--repeats", type=int, default=3, help="processes per row (the median peak is kept)")
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
    rows = []
    try:
        with tempfile.TemporaryDirectory() as old, tempfile.TemporaryDirectory() as cache:
            # The first load fills the (empty) cache folder that the packed-cache rows then read.
            first = {"env": {"FERRY_CACHE": cache}}
            cases = [(FIRST_LOAD, ["generate", *common], {**first, "repeats": 1}),
                     (WHOLE, ["generate", *common], first)]
            cases += [(f"ferry edge --split {k}", [*edge, "--split", k], {}) for k in args.splits.split(",")]
            cases += [("ferry edge --split 4 --fallback local", [*edge, "--split", "4", "--fallback", "local"], {}),
                      (FLOOR, [*edge, "--split", "4"], {"token": "wrong"})]
            if args.before:
                archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True)
                subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
                cases.append((f"ferry edge --split 4 at {args.before}", [*edge, "--split", "4"], {"tree": Path(old)}))
            results = [(TORCH, torch_floor(args.repeats))]
            print(f"{TORCH:<72} {results[0][1]['peak_rss_mib']:>8.1f} MiB", flush=True)
            for name, argv, kw in cases:
                results.append((name, run(argv, **{"repeats": args.repeats, **kw})))
                print(f"{name:<72} {results[-1][1]['peak_rss_mib']:>8.1f} MiB  exit {results[-1][1]['exit']}",
                      flush=True)
            for name, result in results:
                link = (result["json"] or {}).get("completions", [{}])[0].get("link", {})
                rows.append({"process": name, "peak_rss_mib": result["peak_rss_mib"],
                             "peak_range_mib": result["peak_range_mib"],
                             "reported_peak_rss_mib": link.get("peak_rss_mib", ""),
                             "weights_read": (result["json"] or {}).get("weights_read", ""),
                             "exit": result["exit"], "wall_s": result["wall_s"], "error": result["error"][:120]})
    finally:
        cloud.terminate()
        cloud.wait(60)
    peak = {r["process"]: r["peak_rss_mib"] for r in rows}
    whole, first_load, floor = peak[WHOLE], peak[FIRST_LOAD], peak[FLOOR]
    for r in rows:
        r["vs_whole_model"] = round(r["peak_rss_mib"] / whole, 3)
        r["vs_first_load"] = round(r["peak_rss_mib"] / first_load, 3)
        r["above_floor_vs_whole_model"] = round((r["peak_rss_mib"] - floor) / (whole - floor), 3)
    meta = {**provenance(torch.device("cpu")), "prompt": PROMPT, "max_tokens": 16, "repeats": args.repeats,
            "note": "peak RSS per process: VmHWM of its address space, reported at exit, median of `repeats` "
                    "processes (the first load: one); SmolLM2-135M-Instruct Q4_1 GGUF in the CPU's default dtype "
                    "(bf16 where native: int4 weights); the cloud runs in its own process and is not counted"}
    stem = f"{meta['date']}_edge_memory"
    columns = ["process", "peak_rss_mib", "peak_range_mib", "vs_whole_model", "vs_first_load",
               "above_floor_vs_whole_model", "reported_peak_rss_mib", "weights_read", "exit", "wall_s"]
    notes = ("vs_whole_model: peak RSS / that of `ferry generate` reading the packed cache (every run after a "
             "machine's first); vs_first_load: / that of the first run, which converts the GGUF. "
             "above_floor_vs_whole_model: vs_whole_model with the floor (an edge refused by the cloud before reading "
             "weights) subtracted from both: what the weights and the run cost. Python with torch imported alone is "
             f"{peak[TORCH] / whole:.0%} of the whole-model process and the floor {floor / whole:.0%}, so a split "
             "edge in one Python + torch process cannot go below that however few layers it holds.")
    json_path, md_path = write_results(args.out, stem, meta, rows, columns, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
