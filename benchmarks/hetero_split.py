"""Uneven splits for devices of unequal speed, side by side with even ones, and a GPU + CPU pipeline against
streaming the layers a GPU budget cannot hold.

    python benchmarks/hetero_split.py cpu                          # 2 CPU ranks, one slowed 2x: PP and TP, even vs measured
    python benchmarks/hetero_split.py gpu-cpu --shape llama3-8b    # one GPU + the host: even vs measured layer split
    python benchmarks/hetero_split.py offload --shape llama3-8b --gpu-memory 12GiB   # stream vs a CPU stage

`cpu` runs the default model (real weights, fp32, one thread per rank; the second rank runs every matmul
--slowdown times, 3 by default: a device more than 2x slower). `gpu-cpu` and `offload` use random weights of a real architecture's shape (bf16 on the GPU,
the host's default on the CPU). Every layout runs Ferry's serving engine; aggregate decode tokens/s = batch x the
median per-sequence rate. Per pipeline stage: its compute per micro-batch step and its host's waits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.hetero_speed import HeteroJob, run_placed
from ferry.bench.report import provenance, write_results
from ferry.bench.shapes import SHAPES
from ferry.parallel.launch import keep_multicast_off
from ferry.parallel.placement import placement_from_json

ONE = {"device": "cpu", "threads": 1}


def cpu_jobs(args, config, model: str) -> list[HeteroJob]:
    # Matmuls run `slowdown` times; norms, rotary and attention once: 3 makes a layer about 2.3x slower (the
    # measured per-layer times are in the pp-measured layout's speed_split).
    SLOWED = {"device": "cpu", "threads": 1, "slowdown": args.slowdown}
    half = config.num_layers // 2
    layouts = {
        "pp even": {"stages": [{"ranks": [ONE], "layers": half}, {"ranks": [SLOWED], "layers": config.num_layers - half}]},
        "pp measured": {"stages": [{"ranks": [ONE]}, {"ranks": [SLOWED]}]},
        "tp even": {"stages": [{"ranks": [ONE, SLOWED]}]},
        "tp measured": {"stages": [{"ranks": [ONE, SLOWED], "shares": "auto"}]},
    }
    return [HeteroJob(label, config, model, "fp32", placement_from_json(doc, label), batches=args.batches,
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                      kv_memory="0.5GiB") for label, doc in layouts.items()]


def gpu_cpu_jobs(args, config) -> list[HeteroJob]:
    half = config.num_layers // 2
    layouts = {
        "one gpu": None,
        "gpu+cpu even": {"stages": [{"ranks": [{"device": "cuda:0"}], "layers": half},
                                    {"ranks": [{"device": "cpu"}], "layers": config.num_layers - half}]},
        "gpu+cpu measured": {"stages": [{"ranks": [{"device": "cuda:0"}]}, {"ranks": [{"device": "cpu"}]}]},
        # The order `ferry plan --stages cuda:0,cpu` recommends: the host runs the first layers, the GPU the head.
        "cpu+gpu measured": {"stages": [{"ranks": [{"device": "cpu"}]}, {"ranks": [{"device": "cuda:0"}]}]},
    }
    return [HeteroJob(label, config, None, None, placement_from_json(doc, label) if doc else None,
                      batches=args.batches, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                      repeats=args.repeats, kv_memory=args.kv_memory) for label, doc in layouts.items()]


def offload_jobs(args, config) -> tuple[list[HeteroJob], dict]:
    from ferry.device import resolve_dtype
    from ferry.parallel.offload_plan import choose, gpu_layers_within, measure_devices, parse_size

    budget = parse_size(args.gpu_memory)
    on_gpu = gpu_layers_within(config, 2, budget)
    host = config.num_layers - on_gpu
    # What `ferry generate --gpu-memory` would choose, per batch: measured here, in the same run.
    gpu, cpu, h2d = measure_devices(config, torch.device("cuda"), torch.bfloat16,
                                    resolve_dtype(None, torch.device("cpu")))
    choices = {b: choose(config, 2, budget, b, gpu, cpu, h2d).to_json() for b in args.batches}
    stages = {"stages": [{"ranks": [{"device": "cpu"}], "layers": host},
                         {"ranks": [{"device": "cuda:0"}], "layers": on_gpu}]}
    common = dict(batches=args.batches, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                  kv_memory=args.kv_memory)
    jobs = [HeteroJob("one gpu, all layers", config, None, None, **common),
            HeteroJob(f"stream {host} layers", config, None, None, streamed_layers=host, **common),
            HeteroJob(f"cpu stage {host} layers", config, None, None, placement_from_json(stages, "offload"),
                      **common)]
    return jobs, {"gpu_layers": on_gpu, "host_layers": host, "h2d_GBps": round(h2d / 1e9, 2),
                  "auto_choice_by_batch": choices}


def main() -> None:
    keep_multicast_off()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["cpu", "gpu-cpu", "offload"])
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has")
    ap.add_argument("--gpu-memory", default="12GiB")
    ap.add_argument("--slowdown", type=int, default=3, help="cpu: the slow rank runs every matmul this many times")
    ap.add_argument("--only", default=None, help="run only the layouts whose name starts with this (e.g. tp)")
    ap.add_argument("--stem-suffix", default="", help="added to the result file's name")
    ap.add_argument("--batches", default=None, help="default: 1,8 on cpu, 1,16 on GPUs")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-memory", default="4GiB")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    gpu = args.case != "cpu"
    args.batches = tuple(int(b) for b in (args.batches or ("1,16" if gpu else "1,8")).split(","))
    args.prompt_len = args.prompt_len or (128 if gpu else 32)
    args.new_tokens = args.new_tokens or (32 if gpu else 24)
    extra = {}
    if args.case == "cpu":
        from ferry.model.loader import open_checkpoint, resolve_model_path

        path = resolve_model_path(None)
        config = open_checkpoint(path)[1]
        jobs, name = cpu_jobs(args, config, str(path)), "smollm2-135m"
    else:
        if not torch.cuda.is_available():
            sys.exit(f"{args.case} needs a GPU")
        config = SHAPES[args.shape]
        if args.layers:
            config = replace(config, num_layers=args.layers)
        name = args.shape
        if args.case == "gpu-cpu":
            jobs = gpu_cpu_jobs(args, config)
        else:
            jobs, extra = offload_jobs(args, config)

    if args.only:
        jobs = [j for j in jobs if j.label.startswith(args.only)]
    rows, details = [], {}
    for job in jobs:
        result = run_placed(job)
        details[job.label] = {k: v for k, v in result.items() if k != "rows"}
        rows += result["rows"]
        print(f"{job.label}: " + ", ".join(f"b{r['batch']} {r['aggregate_tokens_per_s']:.1f} tok/s"
                                           for r in result["rows"]), flush=True)
        for r in result["rows"]:
            for rank, t in enumerate(r.get("stage_times", [])):
                print(f"    b{r['batch']} rank {rank}: {json.dumps(t)}", flush=True)

    by = {(r["layout"], r["batch"]): r["aggregate_tokens_per_s"] for r in rows}
    baseline = {"cpu": {"pp measured": "pp even", "tp measured": "tp even"},
                "gpu-cpu": {"gpu+cpu measured": "gpu+cpu even", "cpu+gpu measured": "gpu+cpu even",
                            "one gpu": "gpu+cpu even"},
                "offload": {j.label: jobs[1].label for j in jobs}}[args.case]
    for r in rows:
        if r["layout"] in baseline and (baseline[r["layout"]], r["batch"]) in by:
            r["vs"] = baseline[r["layout"]]
            r["ratio"] = round(r["aggregate_tokens_per_s"] / by[(baseline[r["layout"]], r["batch"])], 3)
        r["stages"] = " / ".join(f"{t['compute_ms']:.1f}" for t in r.get("stage_times", [])) or ""
    device = torch.device("cuda" if gpu else "cpu")
    meta = provenance(device) | {"case": args.case, "model": name, "num_layers": config.num_layers,
                                 "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                 "repeats": args.repeats, "cpu_threads": os.cpu_count(), "layouts": details, **extra}
    if args.case == "cpu":
        meta["slowdown"] = args.slowdown
    stem = f"{meta['date']}_hetero_{args.case}_{name}_{device.type}{args.stem_suffix}"
    columns = ["layout", "batch", "aggregate_tokens_per_s", "tokens_per_s", "vs", "ratio", "stages"]
    notes = ("Aggregate decode tokens/s = batch x median per-sequence rate. `stages`: each rank's compute per "
             "micro-batch step in ms (CUDA events on a GPU, wall time on a CPU). `ratio`: against the layout in "
             "`vs`, measured in the same run.")
    json_path, md_path = write_results(args.out, stem, meta, rows, columns, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
