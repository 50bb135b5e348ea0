"""The one-kernel all-reduce + residual add + RMSNorm against NCCL (or Ferry's chosen path) plus a separate
add+RMSNorm, per message size, in CUDA graphs; checks the fused result equals the unfused one bit for bit.

    python benchmarks/fused_allreduce_norm.py --ranks 2 --width 4096     # Llama-3-8B's hidden size
    python benchmarks/fused_allreduce_norm.py --ranks 2 --width 8192     # Llama-3-70B's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.fused_norm import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    result, json_path, md_path = run(args.ranks, args.width, args.out)
    print(md_path.read_text())
    print(f"wrote {json_path}", file=sys.stderr)
    if result["wrong"]:
        sys.exit(f"the fused result differed from the unfused one at sizes {result['wrong']}")


if __name__ == "__main__":
    main()
