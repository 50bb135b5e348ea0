"""Quality of weight-only int8 (`--weights int8`, bf16 activations, CPU) against the fp32 model: teacher-forced
top-1 agreement, max logit error and perplexity, on the text the test uses and on the text that ships with Ferry.

    python benchmarks/int8_quality.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.edge_codecs import eval_text  # noqa: E402
from ferry.bench.report import provenance, write_results  # noqa: E402
from ferry.bench.tp_quality import compare, teacher_forced_logits  # noqa: E402
from ferry.model.loader import load_model  # noqa: E402

# The paragraph tests/test_int8_weights.py checks (>= 90% agreement there).
TEST_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
             "movable metal type, oil-based ink and a wooden press. Within decades, printed books spread across "
             "Europe, lowering their cost and changing how knowledge was shared.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    cpu = torch.device("cpu")
    exact = load_model(None, cpu, torch.float32, show_progress=False)
    int8 = load_model(None, cpu, torch.bfloat16, show_progress=False, weights="int8")
    rows = []
    for name, text in (("test text (tests/test_int8_weights.py)", TEST_TEXT), ("shipped text", eval_text())):
        ids = [exact.tokenizer.encode(text)]
        logits = [teacher_forced_logits(loaded.model, ids) for loaded in (exact, int8)]
        rows.append({"text": name, "tokens": len(ids[0]), **compare(*logits, ids)})
        print(rows[-1], file=sys.stderr)
    meta = provenance(cpu) | {"variant": "int8 weights, bf16 activations", "reference": "fp32 weights and activations"}
    cols = ["text", "tokens", "top1_agreement", "max_logit_error", "perplexity_exact", "perplexity_variant"]
    _, md = write_results(args.out, f"{meta['date']}_int8_weights_quality_cpu", meta, rows, cols)
    print(md.read_text())


if __name__ == "__main__":
    main()
