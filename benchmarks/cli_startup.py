"""Wall time of a whole one-token `ferry generate` (Python start, torch import, model load, one token), the way a
user meets it: a fresh process each run, median of --runs.

    python benchmarks/cli_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.report import provenance, write_results  # noqa: E402

COMMAND = ["generate", "Hi", "--max-tokens", "1", "--device", "cpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    # Other processes on the machine slow every run: the load average beside the figure says how busy it was.
    load_before = os.getloadavg()[0]
    subprocess.run([sys.executable, "-m", "ferry.cli", *COMMAND], capture_output=True, check=True, timeout=300)
    walls = []
    for _ in range(args.runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ferry.cli", *COMMAND], capture_output=True, check=True, timeout=300)
        walls.append(time.perf_counter() - t)
    rows = [{"command": "ferry " + " ".join(f'"{w}"' if w == "Hi" else w for w in COMMAND), "runs": args.runs,
             "median_wall_s": round(statistics.median(walls), 2), "min_wall_s": round(min(walls), 2),
             "max_wall_s": round(max(walls), 2)}]
    meta = provenance(torch.device("cpu")) | {"load_average_1min_before": round(load_before, 2),
                                              "load_average_1min_after": round(os.getloadavg()[0], 2)}
    cols = ["command", "runs", "median_wall_s", "min_wall_s", "max_wall_s"]
    _, md = write_results(args.out, f"{meta['date']}_cli_startup_cpu", meta, rows, cols)
    print(md.read_text())


if __name__ == "__main__":
    main()
