"""Hugging Face transformers with `tp_plan="auto"`: the tensor-parallel baseline beside benchmarks/tp_decode.py.

    torchrun --nproc-per-node 2 benchmarks/hf_tp_decode.py --shape llama3-8b --batches 1,16
    torchrun --nproc-per-node 2 benchmarks/hf_tp_decode.py --device cpu --shape tiny --batches 1   # smoke run

A random-weight checkpoint of the shape is written once (rank 0, safetensors, --checkpoint) and loaded with
transformers' own tensor-parallel plan. Decode tokens/s per sequence = (N - 1) / (time of generate(N) - time of
generate(1)), greedy, EOS ignored, median of --repeats; rank 0 writes JSON + markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.parallel.launch import keep_multicast_off  # noqa: E402
from ferry.bench.shapes import SHAPES, TINY  # noqa: E402


def hf_config(config):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False)


def write_random_checkpoint(folder: Path, config, dtype: torch.dtype, device: torch.device) -> None:
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config(config)).to(dtype)
    model.save_pretrained(folder)
    del model


def main() -> None:
    keep_multicast_off()
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama3-8b", choices=[*SHAPES, "tiny"])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", type=Path, default=None, help="folder for the random checkpoint")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    import datetime

    import transformers

    device_type = args.device
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=900))
    rank, world = dist.get_rank(), dist.get_world_size()
    config = TINY if args.shape == "tiny" else SHAPES[args.shape]
    if args.layers:
        config = replace(config, num_layers=args.layers)
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    folder = args.checkpoint or Path(f"/tmp/ferry-random-{args.shape}-{config.num_layers}l")
    if rank == 0 and not (folder / "config.json").exists():
        write_random_checkpoint(folder, config, dtype, torch.device(device_type if device_type == "cpu" else "cuda"))
        if device_type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=dtype).eval()
    device = model.device
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(100, min(config.vocab_size, 30000), (batch, args.prompt_len), generator=gen).to(device)

        def timed(n: int) -> float:
            dist.barrier()
            if device_type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            if device_type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

        timed(2)  # warm-up
        rates = [(args.new_tokens - 1) / (timed(args.new_tokens) - timed(1)) for _ in range(args.repeats)]
        rate = torch.tensor([statistics.median(rates)], dtype=torch.float64, device=device)
        dist.all_reduce(rate, op=dist.ReduceOp.MIN)
        rows.append({"engine": "transformers tp_plan=auto", "tp": world, "batch": batch,
                     "tokens_per_s": round(float(rate), 2), "aggregate_tokens_per_s": round(float(rate) * batch, 1)})
    if rank == 0:
        meta = provenance(torch.device(device_type)) | {"shape": args.shape, "layers": config.num_layers,
                                                        "transformers": transformers.__version__,
                                                        "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"]}
        stem = f"{meta['date']}_hf_tp_decode_{args.shape}_{device_type}_tp{world}"
        json_path, md_path = write_results(args.out, stem, meta, rows,
                                           ["engine", "tp", "batch", "tokens_per_s", "aggregate_tokens_per_s"])
        print(md_path.read_text())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
