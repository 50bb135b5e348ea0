"""Decode speed: Ferry vs Hugging Face transformers `generate`, side by side in one run, against the roofline.

    python benchmarks/decode.py --device cpu                 # SmolLM2 (real GGUF), batch 1 and 8
    python benchmarks/decode.py --device cuda                # SmolLM2 + Llama-3-8B shape (random bf16), batch 1 and 16

Decode tokens/s counts tokens after the first over the time after the first (prefill excluded), per sequence;
`aggregate` multiplies by the batch. Both engines get the same prompts and --new-tokens, and report the median of
--repeats runs after a warm-up. Roofline: measured memory copy bandwidth (read + write counted) over the
bytes a decode step must read (every weight once).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.decode_timing import copy_bandwidth, ferry_decode, graph_step_ms, random_prompts, sync  # noqa: E402
from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.bench.shapes import SHAPES, random_model, weight_bytes_per_token  # noqa: E402
from ferry.device import resolve_device, resolve_dtype  # noqa: E402
from ferry.engine.engine import Engine  # noqa: E402
from ferry.model.default_model import default_model_path  # noqa: E402
from ferry.model.loader import load_model  # noqa: E402


def hf_decode(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, device: torch.device,
              repeats: int) -> float:
    """transformers `generate` (greedy), given Ferry's work and statistic: the same prompts and token count, decode
    tokens/s per sequence (tokens after the first over the time after the first, from an N-token and a 1-token
    run), the median of `repeats` after one warm-up."""
    ids = torch.tensor(random_prompts(batch, prompt_len, vocab, seed=batch), device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))

    def timed(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync(device)
        return time.perf_counter() - t

    timed(new_tokens)  # warm-up
    return statistics.median([(new_tokens - 1) / (timed(new_tokens) - timed(1)) for _ in range(repeats)])


def load_hf_smollm(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).to(device).eval()


def load_hf_random(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = SHAPES[name]
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
    )
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf_cfg, dtype=dtype)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="Ferry's dtype (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--extra-dtypes", default="", help="more Ferry dtypes to run for SmolLM2, e.g. bf16")
    ap.add_argument("--int8", action="store_true", help="also run SmolLM2 with int8 weights (bf16 activations, CPU)")
    ap.add_argument("--models", default=None, help="comma list of smollm2, llama3-8b")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8 on CPU, 1,16 on GPU)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also run Ferry with the compiled decode step (CUDA)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled runs")
    ap.add_argument("--only-compiled", action="store_true", help="with --compile: skip the uncompiled Ferry runs")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tag", default="", help="suffix for the result file name")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    models = (args.models or ("smollm2,llama3-8b" if on_gpu else "smollm2")).split(",")
    batches = [int(b) for b in (args.batches or ("1,16" if on_gpu else "1,8")).split(",")]
    bandwidth = copy_bandwidth(device)
    print(f"device copy bandwidth (read+write): {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)

    rows = []
    for name in models:
        variants = [(dtype, "native"), *[(resolve_dtype(d, device), "native") for d in args.extra_dtypes.split(",") if d]]
        if args.int8:
            variants.append((torch.bfloat16, "int8"))
        for run_dtype, weights in variants:
            if name != "smollm2" and (run_dtype, weights) != (dtype, "native"):
                continue
            t = time.perf_counter()
            if name == "smollm2":
                loaded = load_model(None, device, run_dtype, show_progress=False, weights=weights)
                model, tokenizer = loaded.model, loaded.tokenizer
            else:
                model, tokenizer = random_model(SHAPES[name], device, run_dtype), None
            sync(device)
            load_s = time.perf_counter() - t
            step_bytes = weight_bytes_per_token(model)
            roofline = bandwidth / step_bytes
            variants = ([True] if args.only_compiled else [False, True]) if args.compile and on_gpu else [False]
            for batch, compiled in [(b, c) for c in variants for b in batches]:
                engine = Engine(model, tokenizer, compile=compiled, compile_mode=args.compile_mode if compiled else None)
                rate = ferry_decode(engine, batch, args.prompt_len, args.new_tokens, model.config.vocab_size, args.repeats)
                gpu_ms = graph_step_ms(engine, batch, args.prompt_len + args.new_tokens)
                rows.append({
                    "model": name, "engine": f"ferry ({engine.decode_path})", "weights": weights,
                    "dtype": str(run_dtype).removeprefix("torch."),
                    "batch": batch, "tokens_per_s": round(rate, 2), "aggregate_tokens_per_s": round(rate * batch, 1),
                    "roofline_tokens_per_s": round(roofline, 1), "roofline_fraction": round(rate / roofline, 3),
                    "load_s": round(load_s, 2), "weight_bytes_per_step": step_bytes,
                    "graph_step_ms": round(gpu_ms, 3) if gpu_ms else None,
                    "graph_roofline_fraction": round(1000 / gpu_ms / roofline, 3) if gpu_ms else None,
                })
                print(rows[-1], file=sys.stderr)
            del engine, model
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
        if args.no_hf:
            continue
        t = time.perf_counter()
        hf = load_hf_smollm(default_model_path(), device, dtype) if name == "smollm2" else load_hf_random(name, device, dtype)
        sync(device)
        load_s = time.perf_counter() - t
        with torch.inference_mode():
            for batch in batches:
                rate = hf_decode(hf, batch, args.prompt_len, args.new_tokens, hf.config.vocab_size, device, args.repeats)
                ferry_rate = max(r["tokens_per_s"] for r in rows if r["model"] == name and r["batch"] == batch
                                 and r["engine"].startswith("ferry") and r["dtype"] == str(dtype).removeprefix("torch.")
                                 and r["weights"] == "native")
                rows.append({
                    "model": name, "engine": "transformers generate", "weights": "native", "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch, "tokens_per_s": round(rate, 2), "aggregate_tokens_per_s": round(rate * batch, 1),
                    "load_s": round(load_s, 2), "ferry_speedup": round(ferry_rate / rate, 2),
                })
                print(rows[-1], file=sys.stderr)
        del hf
        gc.collect()

    meta = provenance(device) | {"copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "prompt_len": args.prompt_len,
                                 "new_tokens": args.new_tokens}
    cols = ["model", "engine", "weights", "dtype", "batch", "tokens_per_s", "aggregate_tokens_per_s", "roofline_tokens_per_s",
            "roofline_fraction", "graph_step_ms", "graph_roofline_fraction", "ferry_speedup", "load_s"]
    stem = f"{meta['date']}_decode_{device.type}{args.tag}"
    json_path, md_path = write_results(args.out, stem, meta, rows, cols)
    print((md_path.read_text()))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
