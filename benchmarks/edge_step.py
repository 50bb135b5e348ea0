"""The edge's own CPU work per token, eager vs compiled: one token through layers 0..K-1 of a split (what a plain
split step computes before the hidden state goes out) and one draft step of speculative rounds (the whole model,
on the CPU's default path as `ferry edge --draft self` loads it, or int8 as `--draft int8` does), each through
SequenceRunner as
EdgeClient and Drafter run them. Steps are timed at a context of --context tokens, rounds interleaved, medians.

    python benchmarks/edge_step.py --threads 2 --split 4 --context 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.bench.edge_codecs import eval_text
from ferry.bench.report import provenance, write_results
from ferry.engine.sequence_runner import SequenceRunner
from ferry.model.loader import load_model, resolve_precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", type=int, default=4, help="K: the edge runs layers 0..K-1")
    ap.add_argument("--context", type=int, default=512, help="tokens already in the cache when steps are timed")
    ap.add_argument("--steps", type=int, default=32, help="one-token steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    dtype, weights = resolve_precision(None, "auto", None, cpu)  # what `ferry edge` runs with no --dtype
    models = {"default": load_model(None, cpu, dtype, show_progress=False, weights=weights),
              "int8": load_model(None, cpu, torch.bfloat16, show_progress=False, weights="int8")}
    ids = models["default"].tokenizer.encode(eval_text())
    ids = (ids * (args.context // len(ids) + 2))[: args.context + args.steps]

    cases = []  # (name, runner, inputs for every position)
    for compile in (False, True):
        how = "compiled" if compile else "eager"
        model = models["default"].model
        with torch.inference_mode():
            embedded = model.embed_tokens(torch.tensor(ids))
        cases.append((f"edge layers 0..{args.split - 1}, {how}", SequenceRunner(model, args.split, compile), embedded))
        for weights, loaded in models.items():
            cases.append((f"draft ({weights} weights), {how}", SequenceRunner(loaded.model, None, compile),
                          torch.tensor(ids)))
    compile_s = {}
    for name, runner, inputs in cases:
        began = time.perf_counter()
        runner.warm_up()
        compile_s[name] = time.perf_counter() - began if runner.compiled is not None else None
        runner.run(inputs[: args.context], 0)

    step_ms: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for round_ in range(args.rounds):
        for name, runner, inputs in cases:
            began = time.perf_counter()
            for pos in range(args.context, args.context + args.steps):
                runner.run(inputs[pos : pos + 1], pos)
            step_ms[name].append((time.perf_counter() - began) / args.steps * 1e3)
            print(f"round {round_}: {name}: {step_ms[name][-1]:.2f} ms a step", file=sys.stderr)

    rows = []
    for name, runner, _ in cases:
        eager = name.replace("compiled", "eager")
        loaded = models["int8" if "int8" in name else "default"]
        row = {"step": name, "path": f"{runner.path}; {loaded.model.norm.weight.dtype} activations, matmuls "
                                     f"{loaded.model.weight_formats()}", "ms_per_step": round(statistics.median(step_ms[name]), 3),
               "compile_s": round(compile_s[name], 1) if compile_s[name] is not None else None,
               "ms_rounds": [round(x, 3) for x in step_ms[name]]}
        if eager != name:
            row["speedup_vs_eager"] = round(statistics.median(step_ms[eager]) / row["ms_per_step"], 2)
        rows.append(row)
    meta = provenance(cpu) | {"model": models["default"].path.name, "threads": args.threads, "split": args.split,
                              "context": args.context, "steps": args.steps, "rounds": args.rounds}
    _, md = write_results(args.out, f"{meta['date']}_edge_step", meta, rows,
                          ["step", "ms_per_step", "speedup_vs_eager", "compile_s"],
                          notes="\n".join(f"- {r['step']}: {r['path']}" for r in rows))
    print(md.read_text())


if __name__ == "__main__":
    main()
