"""Pipeline vs tensor parallelism vs one device: decode throughput per batch, over the default link and over a
socket-forced one (NCCL off NVLink and shared memory, as between nodes), side by side in one run.

    python benchmarks/pp_decode.py --device cuda --shape llama3-8b --layouts 1x1,2x1,1x2 --batches 1,16,64 --socket
    python benchmarks/pp_decode.py --device cpu --shape tiny --layouts 1x1,2x1,1x2 --batches 1,8   # gloo smoke run

A layout is TPxPP. Random weights of a real architecture's shape (weights do not change the speed). Reported per
layout and batch: aggregate decode tokens/s (batch x the median per-sequence rate), the ratio to one device, and
for multi-rank layouts measured over both links, the share of its default-link throughput kept over sockets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.pp_speed import SOCKET_LINK, LayoutJob, run_layout
from ferry.bench.report import provenance, write_results
from ferry.bench.shapes import SHAPES
from ferry.parallel.launch import keep_multicast_off


def main() -> None:
    keep_multicast_off()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (smoke runs)")
    ap.add_argument("--layouts", default="1x1,2x1,1x2", help="TPxPP, comma-separated")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per layout and batch in one process (median)")
    ap.add_argument("--rounds", type=int, default=1, help="every layout this many times, in turn (median of rounds)")
    ap.add_argument("--socket", action="store_true", help="also run every multi-rank layout over sockets")
    ap.add_argument("--kv-memory", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--stem", default=None)
    args = ap.parse_args()

    config = SHAPES[args.shape]
    if args.layers:
        config = replace(config, num_layers=args.layers)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    batches = tuple(int(b) for b in args.batches.split(","))
    layouts = [tuple(int(v) for v in text.lower().split("x")) for text in args.layouts.split(",")]
    if args.device == "cuda" and max(tp * pp for tp, pp in layouts) > torch.cuda.device_count():
        sys.exit(f"a layout needs more GPUs than the {torch.cuda.device_count()} present")
    kv_memory = args.kv_memory or ("8GiB" if args.device == "cuda" else "0.5GiB")

    # Every layout once per round, in turn, so a change in the machine's state lands on all of them; each figure is
    # the median of its rounds (on a shared 2-core CPU one invocation of a layout differs from the next by 20-40%).
    runs: dict[tuple, list[dict]] = {}
    paths = {}
    for round_ in range(args.rounds):
        for tp, pp in layouts:
            job = LayoutJob(config, dtype, tp, pp, batches, args.prompt_len, args.new_tokens, args.repeats,
                            kv_memory=kv_memory)
            links = [None, SOCKET_LINK] if args.socket and tp * pp > 1 and args.device == "cuda" else [None]
            for env in links:
                result = run_layout(job, args.device, env)
                for r in result["rows"]:
                    runs.setdefault((r["tp"], r["pp"], r["link"], r["batch"]), []).append(r)
                paths[f"{tp}x{pp}/{result['rows'][0]['link']}"] = result["decode_path"]
                print(f"round {round_ + 1}: tp={tp} pp={pp} {result['rows'][0]['link']}: " + ", ".join(
                    f"b{r['batch']} {r['aggregate_tokens_per_s']:.0f} tok/s" for r in result["rows"]), flush=True)
    rows = []
    for (tp, pp, link, batch), found in runs.items():
        rates = [r["aggregate_tokens_per_s"] for r in found]
        rate = statistics.median(rates)
        rows.append({"tp": tp, "pp": pp, "link": link, "batch": batch, "aggregate_tokens_per_s": round(rate, 1),
                     "tokens_per_s": round(rate / batch, 1), "rounds": rates})

    one = {r["batch"]: r["aggregate_tokens_per_s"] for r in rows if r["tp"] * r["pp"] == 1}
    default = {(r["tp"], r["pp"], r["batch"]): r["aggregate_tokens_per_s"] for r in rows if r["link"] == "default"}
    for r in rows:
        r["layout"] = f"tp{r['tp']}xpp{r['pp']}"
        if r["batch"] in one:
            r["vs_one_device"] = round(r["aggregate_tokens_per_s"] / one[r["batch"]], 3)
        if r["link"] == "socket":
            r["kept_over_socket"] = round(r["aggregate_tokens_per_s"] / default[(r["tp"], r["pp"], r["batch"])], 3)

    meta = provenance(torch.device(args.device)) | {
        "shape": args.shape, "num_layers": config.num_layers, "dtype": dtype, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "rounds": args.rounds, "kv_memory": kv_memory,
        "decode_paths": paths,
        "socket_link_env": SOCKET_LINK if args.socket else None,
    }
    stem = args.stem or f"{meta['date']}_pp_decode_{args.shape}_{args.device}"
    columns = ["layout", "link", "batch", "aggregate_tokens_per_s", "tokens_per_s", "vs_one_device", "kept_over_socket"]
    notes = ("Aggregate decode tokens/s = batch x median per-sequence rate (slowest rank), the median of the rounds "
             "(each round runs every layout once, in turn; `rounds` in the JSON). A pipeline runs as many "
             "micro-batches as stages. Socket: NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1.")
    json_path, md_path = write_results(args.out, stem, meta, rows, columns, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
