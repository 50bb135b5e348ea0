"""CPU decode of the default model (batch 1): Ferry's CPU modes side by side with llama.cpp (when llama-cpp-python,
the `bench-cpu` extra, is installed) and transformers. Runs are interleaved (every engine once per round), figures
are medians over rounds, and the modes that change numerics print their quality against fp32 (teacher-forced
top-1 agreement and perplexity on the shipped text, through the decode step and through one prefill). The kernel
modes pin the GGUF blocks' matmul: Ferry's qmatmul (int8 activations, with bf16 or fp32 around it) or torch's int4
kernel (bf16).

    python benchmarks/cpu_decode.py --threads 2 --rounds 5 --new-tokens 128 --prompt-tokens 499
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.cpu_peers import FerryRunner, LlamaCppRunner, TransformersRunner  # noqa: E402
from ferry.bench.decode_quality import decode_forced_logits  # noqa: E402
from ferry.bench.edge_codecs import eval_text  # noqa: E402
from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.bench.tp_quality import compare, teacher_forced_logits  # noqa: E402
from ferry.model.default_model import default_model_path  # noqa: E402
from ferry.model.loader import load_model  # noqa: E402

# name -> (dtype, weights, compile, FERRY_QMATMUL while loading). "default" is what a long-lived process (the Python
# API, chat, serve) does with no flags here: the compiled decode step; "default eager" is the same without it (what a
# one-shot `ferry generate` runs). The named kernel modes pin the matmul kernel (Ferry's qmatmul, or torch's int4
# kernel) and the activation dtype, whatever the default is.
FERRY_MODES = {
    "ferry default": (None, "auto", None, None),
    "ferry default eager": (None, "auto", False, None),
    "ferry qmatmul bf16": ("bf16", "auto", None, "1"),
    "ferry qmatmul fp32": ("fp32", "quantized", None, "1"),
    "ferry torch int4": ("bf16", "auto", None, "0"),
    "ferry bf16 int8": ("bf16", "int8", None, None),
    "ferry fp32": ("fp32", "native", None, None),
}


class KernelRunner(FerryRunner):
    """Loads with FERRY_QMATMUL set: GGUF blocks packed for Ferry's qmatmul ("1") or torch's int4 kernel ("0")."""

    def __init__(self, name: str, dtype: str | None, weights: str, compile: bool | None, qmatmul: str) -> None:
        super().__init__(name, dtype, weights, compile)
        self.qmatmul = qmatmul

    def load(self) -> float:
        before = os.environ.get("FERRY_QMATMUL")
        os.environ["FERRY_QMATMUL"] = self.qmatmul
        try:
            return super().load()
        finally:
            if before is None:
                del os.environ["FERRY_QMATMUL"]
            else:
                os.environ["FERRY_QMATMUL"] = before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=499)
    ap.add_argument("--loads", type=int, default=3, help="model loads timed per engine (median)")
    ap.add_argument("--skip", nargs="*", default=[], help="engines to leave out (names as printed)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf = default_model_path()

    runners = [FerryRunner(name, dtype, weights, compile) if qmatmul is None
               else KernelRunner(name, dtype, weights, compile, qmatmul)
               for name, (dtype, weights, compile, qmatmul) in FERRY_MODES.items()]
    runners.append(TransformersRunner(gguf))
    try:
        import llama_cpp  # noqa: F401

        runners.insert(0, LlamaCppRunner(gguf, args.threads, args.prompt_tokens + args.new_tokens + 8))
    except ImportError:
        print("llama-cpp-python is not installed (pip install -e '.[bench-cpu]'): llama.cpp is left out",
              file=sys.stderr)
    runners = [r for r in runners if r.name not in args.skip]

    loaded = load_model(None, torch.device("cpu"), torch.float32, show_progress=False)
    text_ids = loaded.tokenizer.encode(eval_text())
    quality_ids = text_ids[:256]
    exact_logits = teacher_forced_logits(loaded.model, [quality_ids])  # the fp32 reference, once for every mode
    looped = text_ids * (args.prompt_tokens // len(text_ids) + 2)  # the text, repeated to the length asked

    def prompt(round_: int) -> list[int]:
        """A different prompt every round (shifted by 17 tokens): no engine's prefix or prompt cache can serve it."""
        return looped[17 * round_ : 17 * round_ + args.prompt_tokens]

    del loaded

    loads: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(args.loads):  # interleaved too: the page cache is warm for every engine alike
        for r in runners:
            if r.name.startswith("transformers") and loads[r.name]:
                continue  # seconds per load; once is enough for the reference
            loads[r.name].append(r.load())
    prefill: dict[str, list[float]] = {r.name: [] for r in runners}
    decode: dict[str, list[float]] = {r.name: [] for r in runners}
    for r in runners:
        r.run(prompt(args.rounds)[:32], 8)  # warm-up: first-call allocations, thread pools
    for round_ in range(args.rounds):
        for r in runners:
            seconds, rate = r.run(prompt(round_), args.new_tokens)
            prefill[r.name].append(args.prompt_tokens / seconds)
            decode[r.name].append(rate)
            print(f"round {round_}: {r.name}: prefill {args.prompt_tokens / seconds:.0f} tok/s, decode {rate:.1f} "
                  f"tok/s", file=sys.stderr)

    peer = "llama.cpp" if "llama.cpp" in decode else None
    rows = []
    for r in runners:
        row = {"engine": r.name, "path": r.path,
               "decode_tok_s": round(statistics.median(decode[r.name]), 1),
               "prefill_tok_s": round(statistics.median(prefill[r.name]), 1),
               "load_s": round(statistics.median(loads[r.name]), 3),
               # Ferry's first load in a fresh cache folder converts and keeps the packed weights; later ones read
               # them (ferry/model/weights/packed_cache.py). load_s is the median over --loads.
               "first_load_s": round(loads[r.name][0], 3),
               "compile_s": round(statistics.median(r.compile_seconds), 1) if getattr(r, "compile_seconds", None)
               else None,
               "decode_tok_s_rounds": [round(x, 1) for x in decode[r.name]]}
        if peer:
            row["decode_vs_llama_cpp"] = round(row["decode_tok_s"] / statistics.median(decode[peer]), 3)
            row["prefill_vs_llama_cpp"] = round(row["prefill_tok_s"] / statistics.median(prefill[peer]), 3)
        if isinstance(r, FerryRunner):  # through the decode step this mode runs, one token at a time
            row |= compare(exact_logits, decode_forced_logits(r.llm.engine, quality_ids), [quality_ids])
            # and through one prefill of the whole text: the multi-row matmuls a prompt takes
            prefilled = compare(exact_logits, teacher_forced_logits(r.llm.engine.model, [quality_ids]), [quality_ids])
            row["prefill_top1_agreement"] = prefilled["top1_agreement"]
        rows.append(row)
        r.close()
    meta = provenance(torch.device("cpu")) | {
        "model": gguf.name, "threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens, "batch": 1, "quality_text": "ferry/data/eval_text.txt, 256 tokens, teacher-forced one token per decode step against "
        "the fp32 model's prefill"}
    cols = ["engine", "decode_tok_s", "prefill_tok_s", "load_s", "first_load_s", "compile_s", "decode_vs_llama_cpp",
            "prefill_vs_llama_cpp", "top1_agreement", "prefill_top1_agreement", "perplexity_exact", "perplexity_variant"]
    _, md = write_results(args.out, f"{meta['date']}_cpu_decode", meta, rows, cols,
                          notes="\n".join(f"- {r['engine']}: {r['path']}" for r in rows))
    print(md.read_text())


if __name__ == "__main__":
    main()
