"""Quality of the int8 compressed all-reduce (tp=2, CPU/gloo) against the exact all-reduce: teacher-forced
top-1 agreement and max logit error over a fixed prompt set, and perplexity on the shipped text.

    python benchmarks/tp_compression.py [--tp 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.edge_codecs import eval_text  # noqa: E402
from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.bench.tp_quality import compare, full_logits_on_ranks  # noqa: E402
from ferry.model.default_model import default_model_path  # noqa: E402
from ferry.model.tokenizer import FerryTokenizer  # noqa: E402
from ferry.model.weights.gguf_file import GGUFWeights  # noqa: E402
from ferry.parallel.launch import spawn  # noqa: E402

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n",
    "Photosynthesis is the process by which green plants",
    "The three laws of motion described by Newton are",
    "To make a cup of tea, first boil the water, then",
    "In distributed systems, consensus algorithms such as Raft",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    path = default_model_path()
    tok = FerryTokenizer.from_gguf(GGUFWeights(path).metadata)
    rows = []
    for name, texts in (("prompt set (6 prompts)", PROMPTS), ("shipped text", [eval_text()])):
        for text in texts:
            ids = [tok.encode(text)]
            exact = spawn(args.tp, "cpu", full_logits_on_ranks, (str(path), ids))
            int8 = spawn(args.tp, "cpu", full_logits_on_ranks, (str(path), ids), compression="int8")
            rows.append({"set": name, "tokens": len(ids[0]), **compare(exact, int8, ids)})
            print(rows[-1], file=sys.stderr)
    prompt_rows = [r for r in rows if r["set"].startswith("prompt")]
    total = sum(r["tokens"] for r in prompt_rows)
    summary = {"set": "prompt set, token-weighted", "tokens": total,
               "top1_agreement": round(sum(r["top1_agreement"] * r["tokens"] for r in prompt_rows) / total, 4),
               "max_logit_error": max(r["max_logit_error"] for r in prompt_rows)}
    rows.insert(len(prompt_rows), summary)
    meta = provenance(torch.device("cpu")) | {"tp": args.tp, "compression": "int8 per token + 8 outliers"}
    cols = ["set", "tokens", "top1_agreement", "max_logit_error", "perplexity_exact", "perplexity_variant"]
    _, md = write_results(args.out, f"{meta['date']}_tp_compressed_allreduce_cpu", meta, rows, cols)
    print(md.read_text())


if __name__ == "__main__":
    main()
