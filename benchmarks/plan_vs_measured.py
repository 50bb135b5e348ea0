"""How well `ferry plan` predicted what `benchmarks/pp_decode.py` measured: per batch and layout, predicted and
measured decode tokens/s, the error, and whether the planner ranked the layouts in the measured order.

    ferry plan --calibrate --shape llama3-8b --batch 16 --prompt 128 --output 128 --json plan_b16.json  # per batch
    python benchmarks/pp_decode.py --shape llama3-8b --layouts 1x1,2x1,1x2 --batches 1,16,64               # measured
    python benchmarks/plan_vs_measured.py --measured RESULT.json --plans plan_b1.json plan_b16.json ... --stem NAME

Only even splits and the default link are compared (what pp_decode.py runs). On a CPU, whose ranks share its cores,
a plan made with `--cpu-ranks R` describes the layouts of R ranks: give one plan per batch and rank count, and each
layout is taken from the plan of its own rank count.

    ferry plan --calibrate --device cpu --shape tiny --dtype fp32 --batch 8 --cpu-ranks 2 --json plan_b8_r2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.report import write_results  # noqa: E402


def compare(measured: dict, plans: list[dict]) -> tuple[list[dict], dict]:
    runs = {(r["tp"], r["pp"], r["batch"]): r["aggregate_tokens_per_s"] for r in measured["results"]
            if r["link"] == "default"}
    by_batch: dict[int, dict[tuple, float]] = {}  # batch -> (tp, pp, batch) -> predicted tokens/s
    for plan in plans:
        batch = plan["workload"]["batch"]
        # A plan over CPU ranks (plan.py's _as_cpu_ranks) describes only layouts of as many ranks as it has.
        cpu_ranks = plan["topology"].get("details", {}).get("cpu_ranks")
        predicted = by_batch.setdefault(batch, {})
        for entry in plan["layouts"]:
            layout = entry["layout"]
            even = max(layout["split"]) - min(layout["split"]) <= 1 and layout["split"] == sorted(layout["split"],
                                                                                                    reverse=True)
            key = (layout["tp"], layout["pp"], batch)
            if cpu_ranks is not None and layout["tp"] * layout["pp"] != cpu_ranks:
                continue
            if key in runs and even and layout["micro_batches"] == layout["pp"] and key not in predicted:
                predicted[key] = entry["decode_tok_s"]
    rows, orders = [], {}
    for batch, predicted in by_batch.items():
        for key, tok_s in predicted.items():
            rows.append({"batch": batch, "layout": f"tp{key[0]}xpp{key[1]}", "predicted_tokens_per_s": round(tok_s, 1),
                         "measured_tokens_per_s": runs[key], "error": round(tok_s / runs[key] - 1, 3)})
        by_prediction = sorted(predicted, key=predicted.get, reverse=True)
        by_measurement = sorted(predicted, key=runs.get, reverse=True)
        orders[batch] = {"predicted": [f"tp{k[0]}xpp{k[1]}" for k in by_prediction],
                         "measured": [f"tp{k[0]}xpp{k[1]}" for k in by_measurement]}
    summary = {
        "max_abs_error": max(abs(r["error"]) for r in rows),
        "within_25_percent": sum(abs(r["error"]) <= 0.25 for r in rows), "compared": len(rows),
        "orders": orders, "orders_agree": sum(o["predicted"] == o["measured"] for o in orders.values()),
    }
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", type=Path, required=True)
    ap.add_argument("--plans", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--stem", required=True)
    ap.add_argument("--plan-commit", default=None, help="the commit whose `ferry plan` wrote --plans")
    args = ap.parse_args()
    measured = json.loads(args.measured.read_text())
    plans = [json.loads(p.read_text()) for p in args.plans]
    rows, summary = compare(measured, plans)
    meta = {key: measured[key] for key in ("device", "date", "git_commit", "shape") if key in measured}
    meta["command"] = "python " + " ".join(sys.argv)
    meta |= {"plan_commit": args.plan_commit, "measured_file": args.measured.name, "plan_topology": plans[0]["topology"].get("source"),
             "plan_calibration": plans[0].get("calibration"), "summary": summary}
    for batch, order in summary["orders"].items():
        print(f"batch {batch}: predicted {' > '.join(order['predicted'])}; measured {' > '.join(order['measured'])}")
    print(f"{summary['within_25_percent']} of {summary['compared']} predictions within 25%, largest error "
          f"{summary['max_abs_error']:.0%}; order right for {summary['orders_agree']} of {len(summary['orders'])} batches")
    notes = (f"Predicted by `ferry plan` (topology: {meta['plan_topology']}); measured: `{args.measured.name}`. "
             f"Order right for {summary['orders_agree']} of {len(summary['orders'])} batches; "
             f"{summary['within_25_percent']} of {summary['compared']} predictions within 25%.")
    json_path, md_path = write_results(args.out, args.stem, meta, rows,
                                       ["batch", "layout", "predicted_tokens_per_s", "measured_tokens_per_s", "error"],
                                       notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
