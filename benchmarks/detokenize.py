"""Host cost of turning each sampled token into text (incremental detokenization + stop-string check), by position.

    python benchmarks/detokenize.py [--tokens 4000]

This is host work the engine does for step N while the GPU runs step N+1 (async readback), so it must stay
small and flat: a cost that grows with the generated length eats the overlap in long generations.
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
from ferry.engine.sequence import Sequence  # noqa: E402
from ferry.model.default_model import default_model_path  # noqa: E402
from ferry.model.loader import open_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    _, _, tok = open_checkpoint(default_model_path())
    text = "The quick brown fox jumps over the lazy dog; naïve café, 東京, 🚀. "
    ids = (tok.encode(text * (args.tokens // 10 + 1)))[: args.tokens]
    seq, costs = Sequence([1]), []
    for token in ids:
        started = time.perf_counter()
        seq.append(token, tok, frozenset(), ("<|stop|>", "\n\n\n"), max_tokens=10**9)
        costs.append((time.perf_counter() - started) * 1e6)
    rows = []
    for lo in (0, len(ids) // 4, len(ids) // 2, len(ids) - 100):
        window = costs[lo : lo + 100]
        naive = []  # the old way, side by side: decode every generated token again at each step
        for i in range(lo, lo + len(window)):
            started = time.perf_counter()
            tok.decode(ids[: i + 1])
            naive.append((time.perf_counter() - started) * 1e6)
        ours, theirs = statistics.median(window), statistics.median(naive)
        rows.append({"positions": f"{lo}-{lo + len(window) - 1}", "incremental_us_per_token": round(ours, 2),
                     "decode_all_us_per_token": round(theirs, 2), "speedup": round(theirs / ours, 1)})
    meta = provenance(torch.device("cpu")) | {"tokens": len(ids), "total_ms": round(sum(costs) / 1000, 1)}
    json_path, md_path = write_results(args.out, f"{meta['date']}_detokenize_cpu", meta, rows,
                                       ["positions", "incremental_us_per_token", "decode_all_us_per_token", "speedup"])
    print(md_path.read_text())


if __name__ == "__main__":
    main()
