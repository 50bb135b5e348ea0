"""Tensor-parallel decode and prefill speed: TP=1 vs TP=N side by side in one run, against the TP roofline.

    python benchmarks/tp_decode.py --device cuda --shape llama3-8b --tp 1,2            # 2 GPUs: issue targets
    python benchmarks/tp_decode.py --device cuda --shape llama3-70b --tp 4 --batches 1,16
    python benchmarks/tp_decode.py --device cpu --shape tiny --tp 1,2 --prefill 4x128  # smoke run, gloo
    python benchmarks/tp_decode.py --shape llama3-70b --tp 2 --prefill 0x0 --variants fused   # 140 GB: 2 GPUs

Variants (--variants, side by side in one run): `fused` is Ferry's default on GPUs (Triton kernels for the
elementwise steps; all-reduce + add + RMSNorm fused where calibration finds it faster); `fused-ar-unfused` keeps the
elementwise kernels but never fuses the all-reduce; `torch` runs the elementwise steps as torch ops with no fusion
(Ferry before the fused kernels). Per decode row: the profile of one captured step (kernels, GPU-busy share and
microseconds per kernel family).

Random weights of a real architecture's shape (weights do not change the speed). Per batch: tokens/s per sequence
(after the first token), the all-reduce latency on the path Ferry picked, the TP roofline and the share of it.
Prefill: one forward of SEQSxTOKENS with and without micro-batch overlap (--overlap-prefill).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.bench.shapes import SHAPES, TINY  # noqa: E402
from ferry.bench.tp_speed import SpeedJob, add_scaling, run_tp_speed  # noqa: E402
from ferry.parallel.launch import keep_multicast_off  # noqa: E402

VARIANTS = {  # name -> (elementwise kernels, all-reduce mode)
    "fused": ("fused", "auto"),
    "fused-ar-unfused": ("fused", "auto,unfused"),
    "torch": ("torch", "auto,unfused"),
}


def main() -> None:
    keep_multicast_off()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama3-8b", choices=[*SHAPES, "tiny"])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (smoke runs)")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill", default="8x1024", help="SEQSxTOKENS, or 0x0 to skip")
    ap.add_argument("--allreduce", default="auto")
    ap.add_argument("--variants", default="fused,torch", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--stem-suffix", default="", help="appended to the result files' names (e.g. _fused)")
    args = ap.parse_args()

    config = TINY if args.shape == "tiny" else SHAPES[args.shape]
    if args.layers:
        config = replace(config, num_layers=args.layers)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    seqs, tokens = (int(v) for v in args.prefill.lower().split("x"))
    job = SpeedJob(config, dtype, tuple(int(b) for b in args.batches.split(",")), args.prompt_len, args.new_tokens,
                   args.repeats, (seqs, tokens), args.allreduce, args.compile)
    tp_sizes = [int(t) for t in args.tp.split(",")]
    if args.device == "cuda" and max(tp_sizes) > torch.cuda.device_count():
        sys.exit(f"--tp {max(tp_sizes)} needs that many GPUs; {torch.cuda.device_count()} present")
    results = []
    for variant in args.variants.split(","):
        kernels, allreduce = VARIANTS[variant]
        sizes = [t for t in tp_sizes if t > 1] if variant == "fused-ar-unfused" else tp_sizes  # TP=1: as `fused`
        allreduce = args.allreduce if allreduce == "auto" else allreduce
        for res in run_tp_speed(replace(job, kernels=kernels, allreduce=allreduce), sizes, args.device):
            for row in res["rows"]:
                row["variant"] = variant
            results.append(res | {"variant": variant})
    add_scaling(results)

    rows = [r for res in results for r in res["rows"]]
    meta = provenance(torch.device(args.device)) | {
        "shape": args.shape, "layers": config.num_layers, "dtype": dtype, "job": asdict(job),
        "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"],
        "per_run": [{k: v for k, v in res.items() if k != "rows"} for res in results],
    }
    stem = f"{meta['date']}_tp_decode_{args.shape}_{args.device}_tp{'-'.join(map(str, tp_sizes))}{args.stem_suffix}"
    cols = ["test", "variant", "tp", "batch", "tokens_per_s", "aggregate_tokens_per_s", "vs_tp1", "graph_step_ms",
            "weight_roofline_tokens_per_s", "of_weight_roofline", "kernels_per_step", "gpu_busy_share", "matmul_us",
            "all-reduce_us", "attention_us", "ferry_fused_elementwise_us", "other_eager_kernels_us", "allreduce_us",
            "prefill_tokens", "prefill_ms", "prefill_overlap_ms", "overlap_speedup"]
    notes = "\n\n".join(f"{res['variant']}, tp={res['tp']}: decode path {res['decode_path']}, copy bandwidth "
                        f"{res['copy_bandwidth_GBps']} GB/s, all-reduce calls {res['allreduce_calls']}\n\n```\n"
                        f"{res['allreduce_plan']}\n```" for res in results)
    json_path, md_path = write_results(args.out, stem, meta, rows, cols, notes=notes)
    print(md_path.read_text())
    print(f"wrote {json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
