"""Which decode path reaches the roofline on this GPU: batch-1 (and optionally larger) decode of a real shape
through Ferry's engine, once per path, each in a fresh process, side by side against the measured copy bandwidth.

    python benchmarks/decode_paths.py --shape llama3-8b --gpus 0,1          # every path, two at a time
    python benchmarks/decode_paths.py --paths graph,compile --gpus 0

Paths: `graph` (CUDA graphs, no compile: what `ferry generate` runs by default), `compile` (torch.compile's
default mode inside the graphs), `autotune` (mode max-autotune-no-cudagraphs: Triton GEMV templates tuned per
shape), `autotune-cd` (the same plus inductor's coordinate-descent tuning of every kernel's launch parameters).
Per path: tokens/s from the engine's own timing (median of 3 runs after a warm-up), the GPU time of one captured
step, the share of the roofline each reaches, how long the first generate took (compile + capture), and where a
step's GPU time goes (kernel families from torch.profiler over graph replays).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATHS = {  # name -> (compile, torch.compile mode, extra environment)
    "graph": (False, None, {}),
    "compile": (True, "default", {}),
    "autotune": (True, "max-autotune-no-cudagraphs", {}),
    "autotune-cd": (True, "max-autotune-no-cudagraphs", {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"}),
}


def one_path(name: str, shape: str, batches: list[int], prompt_len: int, new_tokens: int) -> dict:
    """Runs in its own process (fresh compile state): every batch of one path."""
    from ferry.bench.decode_timing import (
        captured_step,
        copy_bandwidth,
        ferry_decode,
        graph_step_ms,
        step_profile,
    )
    from ferry.bench.shapes import SHAPES, random_model, weight_bytes_per_token
    from ferry.engine.engine import Engine

    compile, mode, _ = PATHS[name]
    device = torch.device("cuda")
    config = SHAPES[shape]
    model = random_model(config, device, torch.bfloat16)
    engine = Engine(model, None, compile=compile, compile_mode=mode)
    bandwidth = copy_bandwidth(device)
    roofline = bandwidth / weight_bytes_per_token(model)
    rows = []
    for batch in batches:
        started = time.perf_counter()
        tok_s = ferry_decode(engine, batch, prompt_len, new_tokens, config.vocab_size, repeats=3)
        first_s = time.perf_counter() - started  # warm-up (compile + capture) and the three timed runs
        context = prompt_len + new_tokens
        step_ms = graph_step_ms(engine, batch, context)
        profile = step_profile(captured_step(engine, batch, context).graph)
        rows.append({"path": name, "decode_path": engine.decode_path, "batch": batch, "tokens_per_s": round(tok_s, 1),
                     "roofline_tokens_per_s": round(roofline, 1), "of_roofline": round(tok_s / roofline, 3),
                     "graph_step_ms": round(step_ms, 3), "graph_of_roofline": round(1000 / step_ms / roofline, 3),
                     "kernels_per_step": profile["kernels_per_step"],
                     "gpu_busy_share": round(profile["busy_us"] / 1000 / step_ms, 3),
                     "first_generate_s": round(first_s, 1), "profile": profile})
    return {"copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "device": torch.cuda.get_device_name(device),
            "rows": rows}


def run_paths(names: list[str], gpus: list[str], argv_common: list[str], timeout_s: int) -> list[dict]:
    """Each path in its own process, as many at once as there are GPUs (one path per GPU)."""
    waiting, running, results = list(names), {}, []
    while waiting or running:
        while waiting and len(running) < len(gpus):
            name = waiting.pop(0)
            gpu = next(g for g in gpus if g not in {g2 for g2, _, _ in running.values()})
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, **PATHS[name][2]}
            proc = subprocess.Popen([sys.executable, __file__, "--one", name, *argv_common], env=env,
                                    stdout=subprocess.PIPE, text=True)
            running[name] = (gpu, proc, time.monotonic())
        for name, (gpu, proc, started) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started < timeout_s:
                continue
            if proc.poll() is None:
                proc.kill()
            out = proc.communicate()[0]
            del running[name]
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if proc.returncode == 0 and lines:
                results.append(json.loads(lines[-1]) | {"gpu": gpu})
            else:
                results.append({"rows": [{"path": name, "error": f"exit {proc.returncode} after "
                                                                  f"{time.monotonic() - started:.0f} s"}], "gpu": gpu})
            print(f"{name} on GPU {gpu}: done", file=sys.stderr, flush=True)
        time.sleep(1)
    return results


def main() -> None:
    from ferry.parallel.launch import keep_multicast_off

    keep_multicast_off()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gpus", default="0")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per path (compile included)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.one:
        print(json.dumps(one_path(args.one, args.shape, batches, args.prompt_len, args.new_tokens)), flush=True)
        return

    from ferry.bench.report import provenance, write_results

    common = ["--shape", args.shape, "--batches", args.batches, "--prompt-len", str(args.prompt_len),
              "--new-tokens", str(args.new_tokens)]
    results = run_paths(args.paths.split(","), args.gpus.split(","), common, args.timeout)
    rows = [r | {"gpu": res["gpu"], "copy_bandwidth_GBps": res.get("copy_bandwidth_GBps")}
            for res in results for r in res["rows"]]
    meta = provenance(torch.device("cuda")) | {"shape": args.shape, "prompt_len": args.prompt_len,
                                               "new_tokens": args.new_tokens}
    stem = f"{meta['date']}_decode_paths_{args.shape}{args.tag}"
    cols = ["path", "batch", "tokens_per_s", "roofline_tokens_per_s", "of_roofline", "graph_step_ms",
            "graph_of_roofline", "kernels_per_step", "gpu_busy_share", "first_generate_s", "copy_bandwidth_GBps",
            "gpu", "error"]
    notes = "\n".join(f"- {r['path']} batch {r['batch']}: " + ", ".join(
        f"{fam} {v['us']} us / {v['kernels']} kernels" for fam, v in r["profile"]["families"].items())
        for r in rows if "profile" in r)
    json_path, md_path = write_results(args.out, stem, meta, rows, cols, notes="GPU time per step by kernel family:\n\n" + notes)
    print(md_path.read_text())
    print(f"wrote {json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
