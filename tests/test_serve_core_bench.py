"""`ferry bench serve-core` end to end on a tiny random model (CPU, seconds): every part runs and writes its
numbers; the speed claims themselves live in the result files, not here."""

from __future__ import annotations

import json

import torch


def test_serve_core_bench_runs_every_part_and_writes_its_results(tmp_path):
    from ferry.bench.serve_core import run_serve_core_bench
    from ferry.bench.shapes import TINY, random_model

    model = random_model(TINY, torch.device("cpu"), torch.float32)
    run_serve_core_bench(model, None, "tiny_cpu", n=6, concurrency=3, prompt_lens=(8, 24), output_lens=(4, 8),
                         prefix_len=48, kv_memory="0.05GiB", parts=["continuous", "roofline", "batch1", "prefix"],
                         out_dir=tmp_path / "new", log=lambda *_: None, rounds=3)
    [path] = (tmp_path / "new").glob("*_serve_core_tiny_cpu.json")
    doc = json.loads(path.read_text())
    assert [r["engine"] for r in doc["results"]] == ["continuous (paged)", "static batches of 3"]
    assert all(r["output_tokens"] == doc["results"][0]["output_tokens"] for r in doc["results"])  # same workload
    from ferry.bench.serve_core import Workload

    first, other = (Workload.make(6, (8, 24), (4, 8), 8192, tokens_seed=s) for s in (None, 1001))
    assert first.max_tokens == other.max_tokens and list(map(len, first.prompts)) == list(map(len, other.prompts))
    assert first.prompts != other.prompts
    assert doc["continuous_vs_static"] > 0 and doc["continuous_steps"]["eager"]["count"] > 0
    # three alternated rounds; the table's rows are each engine's median round, the ratio that of the medians
    assert doc["rounds"] == 3 and len(doc["round_ratios"]) == 3
    # each round new prompt text of the same lengths: no round prefills less because an earlier one cached a
    # block of it (a stray leading token may match as a copy-on-write start)
    assert doc["prefix_hit_tokens"] < 16
    cont, stat = doc["results"]
    assert doc["continuous_vs_static"] == cont["output_tokens_per_s"] / stat["output_tokens_per_s"]
    assert 0 < doc["decode_roofline"]["of_roofline"] and doc["decode_roofline"]["batch"] == 3
    assert doc["batch1"]["paged_tokens_per_s"] > 0 and doc["prefix_reuse"]["prefix_hit_tokens"] == 48
    assert doc["kv_cache"]["block_size"] == 16 and path.with_suffix(".md").exists()
