"""`ferry plan --stages`'s predictions against a measured GPU + CPU run: the planner's formula fed with the speeds
that run measured (its speed_split) and the host link another run measured, for each layout and batch it ran.

    python benchmarks/hetero_plan_vs_measured.py --measured benchmarks/results/DAY_hetero_gpu-cpu_llama3-8b_cuda.json \
        --h2d-from benchmarks/results/DAY_hetero_offload_llama3-8b_cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.report import git_commit, write_results
from ferry.bench.shapes import SHAPES
from ferry.parallel.cost_model import CostParams
from ferry.parallel.device_speed import DeviceSpeed
from ferry.parallel.placement_plan import predict_placed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", type=Path, required=True)
    ap.add_argument("--h2d-from", type=Path, required=True, help="a result file with h2d_GBps (the offload case)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    measured = json.loads(args.measured.read_text())
    h2d = json.loads(args.h2d_from.read_text())["h2d_GBps"] * 1e9
    config = replace(SHAPES[measured["model"]], num_layers=measured["num_layers"])
    speeds_doc = measured["layouts"]["gpu+cpu measured"]["speed_split"]["speeds"]
    speeds = {s["device"]: DeviceSpeed(s["device"], s["layer_ms"] / 1e3, s["fixed_ms"] / 1e3, 8) for s in speeds_doc}
    sizes, limits = {d: 2 for d in speeds}, {d: float("inf") for d in speeds}
    rows = []
    for label, layout in measured["layouts"].items():
        if "stages" not in layout:
            continue
        split = tuple(int(s.split("..")[1]) - int(s.split()[1].split("..")[0]) + 1 for s in layout["stages"])
        order = ("cpu", "cuda:0") if label.startswith("cpu+gpu") else ("cuda:0", "cpu")
        for r in (r for r in measured["results"] if r["layout"] == label):
            p = predict_placed(config, order, split, speeds, sizes, limits, r["batch"], 2, h2d, CostParams())
            rows.append({"layout": label, "stages": p.stages, "batch": r["batch"],
                         "measured_tok_s": r["aggregate_tokens_per_s"], "predicted_tok_s": p.decode_tok_s,
                         "predicted_over_measured": round(p.decode_tok_s / r["aggregate_tokens_per_s"], 3),
                         "measured_stage_ms": " / ".join(f"{t['compute_ms']:.1f}" for t in r["stage_times"]),
                         "predicted_stage_ms": " / ".join(f"{t:.1f}" for t in p.stage_ms)})
    meta = {"device": measured["device"], "date": measured["date"], "measured": args.measured.name,
            "measured_commit": measured["git_commit"], "planner_commit": git_commit(),
            "h2d_GBps": h2d / 1e9, "command": " ".join(sys.argv)}
    stem = f"{measured['date']}_hetero_plan_vs_measured_{measured['model']}_cuda"
    columns = ["layout", "stages", "batch", "measured_tok_s", "predicted_tok_s", "predicted_over_measured",
               "measured_stage_ms", "predicted_stage_ms"]
    notes = ("Predicted: ferry/parallel/placement_plan.py's formula with the per-layer and fixed times the measured "
             "run's ranks timed (its speed_split), the host link from the offload run, 2 micro-batches. Measured "
             "stage ms: compute per micro-batch step (CUDA events on the GPU, wall time on the CPU).")
    _, md_path = write_results(args.out, stem, meta, rows, columns, notes)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
