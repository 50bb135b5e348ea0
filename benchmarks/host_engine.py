"""The host <-> device link inside the engine (GPU): async token readback vs --sync-output on SmolLM2, and weight
streaming of a Llama-3-8B-shape model with every layer offloaded, against bytes / measured pinned bandwidth and
against the naive path (pageable memory, each layer copied synchronously when reached), side by side.

    python benchmarks/host_engine.py [--skip-smollm]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.bench.shapes import LLAMA3_8B, random_model  # noqa: E402
from ferry.comm.weight_stream import LayerStreamer  # noqa: E402
from ferry.engine.engine import Engine  # noqa: E402
from ferry.engine.kv_cache import KVCache  # noqa: E402
from ferry.engine.sampling import SamplingParams  # noqa: E402
from ferry.model.loader import load_model  # noqa: E402


def decode_rate(engine: Engine, prompts: list[list[int]], tokens: int, repeats: int = 3) -> float:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    engine.generate(prompts, params)  # warm-up (graph capture)
    return statistics.median(statistics.median(c.tokens_per_s for c in engine.generate(prompts, params))
                             for _ in range(repeats))


def pinned_h2d_bandwidth(device: torch.device) -> float:
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return host.numel() / statistics.median(times[1:])


@torch.inference_mode()
def offload_step_s(model, steps: int = 5) -> float:
    cache = KVCache.for_model(model)
    cache.ensure(1, 64)
    ids = torch.tensor([[1000]], device="cuda")
    times = []
    for i in range(steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids, torch.tensor([[10 + i]], device="cuda"), cache.layers, 11 + i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = []
    if not args.skip_smollm:
        loaded = load_model(None, device, torch.bfloat16, show_progress=False)
        tok = loaded.tokenizer
        base = [tok.encode_chat(p) for p in ("Tell me about the moon.", "Write a haiku.", "What is 2+2?", "Hi!")]
        for batch in (1, 16):
            prompts = (base * 4)[:batch]
            rates = {}
            for sync in (True, False):
                rates[sync] = decode_rate(Engine(loaded.model, tok, sync_output=sync), prompts, 128)
            rows.append({"test": "token readback", "model": "smollm2", "batch": batch,
                         "sync_tokens_per_s": round(rates[True], 1), "async_tokens_per_s": round(rates[False], 1),
                         "ratio": round(rates[False] / rates[True], 3)})
            print(rows[-1], file=sys.stderr)
        del loaded
    bandwidth = pinned_h2d_bandwidth(device)
    for mode, pin, prefetch in (("streamed (pinned, double-buffered)", True, True), ("naive (pageable, sync)", False, False)):
        model = random_model(LLAMA3_8B, device, torch.bfloat16)
        streamer = LayerStreamer(list(model.layers), list(range(LLAMA3_8B.num_layers)), device, pin=pin, prefetch=prefetch)
        model.weight_streamer = streamer
        model.register_forward_pre_hook(lambda m, a: m.weight_streamer.start())
        torch.cuda.empty_cache()
        step = offload_step_s(model)
        floor = streamer.bytes_per_layer * len(streamer.streamed) / bandwidth
        rows.append({"test": "weight streaming", "model": "llama3-8b (all 32 layers offloaded)", "mode": mode,
                     "step_s": round(step, 4), "bytes_streamed_per_step": streamer.bytes_per_layer * 32,
                     "floor_s_at_measured_pinned_bw": round(floor, 4), "step_over_floor": round(step / floor, 3),
                     "pinned_h2d_GBps": round(bandwidth / 1e9, 1)})
        print(rows[-1], file=sys.stderr)
        del model, streamer
        torch.cuda.empty_cache()
    meta = provenance(device)
    cols = ["test", "model", "batch", "sync_tokens_per_s", "async_tokens_per_s", "ratio", "mode", "step_s",
            "floor_s_at_measured_pinned_bw", "step_over_floor", "pinned_h2d_GBps"]
    json_path, md_path = write_results(args.out, f"{meta['date']}_host_engine_cuda", meta, rows, cols)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
