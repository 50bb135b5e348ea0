"""`ferry bench serve-overhead`: the summary of its rounds, and one small run end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ferry.bench.serve_overhead import summarize_rounds


def _row(tpot: float, eager: int = 0) -> dict:
    return {"tpot_ms_p50": tpot, "tpot_ms_p99": 2 * tpot, "itl_ms_p50": tpot, "ttft_ms_p50": 10.0,
            "ttft_ms_p99": 20.0, "output_tokens_per_s": 1000 / tpot, "eager_steps": eager}


def test_summary_is_each_paths_median_and_the_median_of_paired_ratios():
    direct = [_row(10.0), _row(12.0), _row(11.0)]
    http = [_row(10.5), _row(12.0), _row(13.2, eager=3)]  # rounds' ratios 1.05, 1.0, 1.2
    s = summarize_rounds({"direct": direct, "http": http})["tpot_ms_p50"]
    assert s["direct"] == 11.0 and s["http"] == 12.0
    assert s["http_over_direct"] == pytest.approx(12 / 11)
    assert s["paired_median"] == pytest.approx(1.05)
    eager = summarize_rounds({"direct": direct, "http": http})["eager_steps"]
    assert eager["http_over_direct"] is None and eager["paired_median"] is None  # no division by zero steps


@pytest.mark.slow
def test_a_small_cpu_run_writes_counted_and_warm_up_rows_and_the_servers_link_lines(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "bench", "serve-overhead", "--shape", "tiny", "--device", "cpu",
         "--kv-memory", "0.25GiB", "--concurrency", "2", "--requests", "4", "--rounds", "2", "--prompt-tokens",
         "16-32", "--output-tokens", "4-8", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
        check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(next(tmp_path.glob("*_serve_overhead_tiny_cpu.json")).read_text())
    rounds = [(r["path"], r["round"], r["counted"]) for r in doc["results"]]
    assert rounds == [("direct", -1, False), ("direct", 0, True), ("direct", 1, True),
                      ("http", -1, False), ("http", 0, True), ("http", 1, True)]
    assert all(r["completed"] == 4 and r["pcie_h2d_seconds"] > 0 for r in doc["results"])
    assert doc["rounds_counted"] == 2
    assert any(line.startswith('ferry_link_seconds_total{link="pcie_h2d"}')
               for line in doc["server_link_metrics_under_load"])
