"""The layout planner on synthetic topologies modelled on the reference machines (H100 figures, NVLink from
shared/reference): which layout it recommends, what it refuses, and predictions that move the way hardware does."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from ferry.bench.shapes import LLAMA3_8B, LLAMA3_70B, TINY
from ferry.comm.topology import KNOWN_DEVICES, NVLINK_H100, Link, Topology, preset
from ferry.errors import FerryError
from ferry.parallel.cost_model import Calibration, CostParams, allreduce_seconds
from ferry.parallel.planner import Layout, Workload, enumerate_layouts, plan, predict, stage_splits

H100 = KNOWN_DEVICES["H100"]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
ETHERNET_10G = Link(50e-6, 10e9 / 8, "ethernet 10G")


def cluster(nodes: int, per_node: int, memory_gib: float = 80, inter: Link | None = ETHERNET_10G,
            intra: Link = NVLINK_H100) -> Topology:
    return Topology(nodes, per_node, replace(H100, memory_bytes=memory_gib * 2**30), intra,
                    inter if nodes > 1 else None, source="test")


def invoke(*args: str):
    from typer.testing import CliRunner

    from ferry.cli import app

    return CliRunner().invoke(app, list(args))


def test_nvlink_inside_nodes_and_a_slow_link_between_gives_tp_inside_and_pp_across():
    """70B in bf16 needs four 48 GiB devices; of tp4 (its all-reduces over Ethernet), tp2 x pp2 and tp1 x pp4,
    TP inside each node with the pipeline across them is fastest."""
    topo = cluster(2, 2, memory_gib=48)
    result = plan(LLAMA3_70B, topo, Workload(8, 512, 128))
    best = result.recommended
    assert (best.layout.tp, best.layout.pp) == (2, 2)
    assert best.tp_link == "nvlink x18" and best.pp_links == ("ethernet 10G",)
    by_name = {}
    for p in result.predictions:
        by_name.setdefault(p.layout.name, p)  # the fastest split of each
    assert by_name["tp4 x pp1"].fits and by_name["tp4 x pp1"].tp_link == "ethernet 10G"
    assert by_name["tp4 x pp1"].tpot_s > 1.5 * best.tpot_s
    assert by_name["tp1 x pp4"].tpot_s > 1.5 * best.tpot_s  # a pipeline alone does not split a token's reads
    assert not by_name["tp2 x pp1"].fits and not by_name["tp1 x pp1"].fits
    # the link decides: joined as fast as inside a node, the same two nodes run TP over all four devices
    fast = plan(LLAMA3_70B, cluster(2, 2, memory_gib=48, inter=replace(NVLINK_H100, kind="fast")), Workload(8, 512, 128))
    assert (fast.recommended.layout.tp, fast.recommended.layout.pp) == (4, 1) and fast.recommended.tp_link == "fast"


def test_one_fast_node_prefers_tensor_parallelism_for_batch_one_latency():
    result = plan(LLAMA3_8B, cluster(1, 4), Workload(1, 512, 128))
    best = result.recommended
    assert (best.layout.tp, best.layout.pp) == (4, 1)
    tp1 = next(p for p in result.predictions if (p.layout.tp, p.layout.pp) == (1, 1))
    assert 1.5 < tp1.tpot_s / best.tpot_s < 4  # 4-way weight reads less the all-reduces
    # tp1 decode is the HBM roofline: 16 GB of weights at 3 TB/s is ~5 ms a token
    assert tp1.tpot_s == pytest.approx(LLAMA3_8B.num_params * 2 / H100.mem_bw_Bps, rel=0.1)


def test_a_model_too_big_for_one_device_marks_tp1_pp1_as_not_fitting():
    result = plan(LLAMA3_70B, cluster(1, 8), Workload(1, 512, 128))
    single = next(p for p in result.predictions if p.layout.devices == 1)
    assert not single.fits and single.memory["weights"] > 130e9 and single.memory_bytes > single.memory_limit
    assert result.recommended.fits and result.recommended.layout.devices >= 2
    assert result.predictions[-1].fits is False  # non-fitting layouts sort last


def test_nothing_fits_means_no_recommendation():
    assert plan(LLAMA3_70B, cluster(1, 1, memory_gib=24), Workload(1, 16, 16)).recommended is None


def test_uneven_splits_are_enumerated_and_valid():
    assert stage_splits(32, 2) == [(16, 16), (17, 15), (18, 14), (15, 17)]
    assert stage_splits(3, 3) == [(1, 1, 1)]  # no stage may lose its last layer
    for split in stage_splits(80, 3):
        assert sum(split) == 80 and len(split) == 3 and min(split) >= 1
    layouts = enumerate_layouts(LLAMA3_8B, cluster(1, 4))
    assert Layout(2, 2, 2, (17, 15)) in layouts and all(lay.devices <= 4 for lay in layouts)


def test_the_lm_head_stage_gets_fewer_layers_when_its_head_dominates():
    """Llama-3-8B's 1 GB LM head is ~2.4 layers of weight reads: at pp=2 the best split lightens the last stage
    (the first stage's host term, which weighs the other way, left out)."""
    result = plan(LLAMA3_8B, preset("h200x2-nvlink"), Workload(64, 512, 128), CostParams(pipeline_host_s=0), pp=2)
    first, last = result.predictions[0].layout.split
    assert first > last
    even = next(p for p in result.predictions if p.layout.split == (16, 16))
    assert result.predictions[0].decode_tok_s > 1.05 * even.decode_tok_s


def test_the_pipeline_cycle_is_max_of_micro_batches_and_stages_times_the_stage():
    topo, config = cluster(1, 2), replace(LLAMA3_8B, tie_word_embeddings=False)
    two = predict(config, topo, Layout(1, 2, 2, (16, 16)), Workload(2, 128, 32))
    busy = [s["busy"] for s in two.decode_stages]
    assert two.tpot_s == pytest.approx(max(2, 2) * max(busy))
    one = predict(config, topo, Layout(1, 2, 2, (16, 16)), Workload(1, 128, 32))  # one sequence: the pipe is idle
    assert one.tpot_s == pytest.approx(sum(s["busy"] for s in one.decode_stages))
    assert one.decode_stages[0]["pp_send"] == pytest.approx(NVLINK_H100.seconds(config.hidden_size * 2))
    four = predict(config, topo, Layout(1, 2, 4, (16, 16)), Workload(8, 128, 32))
    assert four.tpot_s == pytest.approx(4 * max(s["busy"] for s in four.decode_stages))


def test_slower_links_make_tensor_parallelism_slower_and_bigger_batches_faster_in_aggregate():
    work, lay = Workload(4, 256, 64), Layout(2, 1, 1, (32,))
    base = predict(LLAMA3_8B, cluster(1, 2), lay, work)
    slow_beta = predict(LLAMA3_8B, cluster(1, 2, intra=replace(NVLINK_H100, beta_Bps=NVLINK_H100.beta_Bps / 10)),
                        lay, work)
    slow_alpha = predict(LLAMA3_8B, cluster(1, 2, intra=replace(NVLINK_H100, alpha_s=NVLINK_H100.alpha_s * 10)),
                         lay, work)
    assert slow_beta.tpot_s > base.tpot_s and slow_alpha.tpot_s > base.tpot_s
    assert slow_alpha.decode_stages[0]["tp_allreduce"] > 5 * base.decode_stages[0]["tp_allreduce"]
    tp1 = predict(LLAMA3_8B, cluster(1, 2), Layout(1, 1, 1, (32,)), work)
    assert tp1.decode_stages[0]["tp_allreduce"] == 0
    big = predict(LLAMA3_8B, cluster(1, 2), lay, replace(work, batch=32))
    assert big.decode_tok_s > 4 * base.decode_tok_s and big.tpot_s > base.tpot_s
    long = predict(LLAMA3_8B, cluster(1, 2), lay, replace(work, prompt=2048))
    assert long.prefill_s > 4 * base.prefill_s
    assert long.memory["kv_cache"] > base.memory["kv_cache"] and long.memory["weights"] == base.memory["weights"]


def test_allreduce_cost_is_log_latency_plus_ring_bytes():
    link = Link(5e-6, 100e9)
    assert allreduce_seconds(link, 1, 1e6) == 0
    assert allreduce_seconds(link, 2, 1e6) == pytest.approx(5e-6 + 1e6 / 100e9)
    assert allreduce_seconds(link, 8, 1e6) == pytest.approx(3 * 5e-6 + 2 * 7 / 8 * 1e6 / 100e9)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is not beside this checkout")
@pytest.mark.parametrize("ranks", [2, 4])
def test_small_allreduces_on_the_h100_preset_link_land_near_the_in_graph_reference(ranks):
    rows = json.loads((REFERENCE / f"2026-11-28_h100x4_allreduce_graph_w{ranks}.json").read_text())["rows"]
    for row in rows[:3]:  # 8 to 128 KiB: latency bound
        predicted = allreduce_seconds(NVLINK_H100, ranks, row["bytes"]) * 1e6
        assert predicted == pytest.approx(row["nccl_graph_us"], rel=0.25)


@pytest.mark.parametrize("kwargs, message", [
    ({"tp": 3}, "--tp 3 neither divides the 8 devices of a node nor spans whole nodes; choose from 1, 2, 4, 8, 16"),
    ({"pp": 0}, "--pp must be between 1 and the model's 32 layers"),
    ({"tp": 16, "pp": 2}, "needs 32 devices; the topology has 16"),
    ({"micro_batches": 0}, "--micro-batches must be 1 or more"),
])
def test_layouts_that_cannot_be_placed_are_clear_errors(kwargs, message):
    with pytest.raises(FerryError, match=re.escape(message)):
        plan(LLAMA3_8B, cluster(2, 8), Workload(1, 16, 16), **kwargs)


def test_workloads_outside_the_model_are_clear_errors():
    with pytest.raises(FerryError, match="--batch must be 1 or more"):
        plan(LLAMA3_8B, cluster(1, 1), Workload(0, 16, 16))
    with pytest.raises(FerryError, match="exceeds the model's context of 8192"):
        plan(LLAMA3_8B, cluster(1, 1), Workload(1, 8000, 1000))


def test_a_calibration_replaces_the_roofline():
    cal = Calibration(((1, 2e-4), (4, 3e-4)), context=32, device="test", fixed_by_tokens=((1, 5e-4), (4, 6e-4)))
    pred = predict(TINY, cluster(1, 1), Layout(1, 1, 1, (4,)), Workload(4, 16, 8), calibration=cal)
    stage = pred.decode_stages[0]
    assert stage["compute"] == pytest.approx(4 * cal.layer_seconds(4)) and stage["kv_read"] == 0
    # The measured fixed part stands in for the launch overhead and the LM head together.
    assert stage["overhead"] + stage["lm_head"] == pytest.approx(6e-4)
    assert pred.tpot_s == pytest.approx(4 * 3e-4 + 6e-4 + stage["embed"])


def test_calibrated_layer_time_interpolates_between_the_measured_points_as_measured():
    cal = Calibration(((1, 1e-3), (8, 2e-3)), context=256, device="test")
    assert cal.layer_seconds(4) == pytest.approx(1e-3 + 1e-3 * 3 / 7)
    assert cal.layer_seconds(15) == pytest.approx(3e-3)  # prefill-sized counts follow the line
    # 3 rows slower than 4 (as torch's fp32 CPU matmul is): 8 rows are read off the 4..16 line, not raised to 3's.
    dip = Calibration(((1, 1e-3), (3, 3e-3), (4, 2e-3), (16, 4e-3)), context=256, device="test")
    assert dip.layer_seconds(3) == pytest.approx(3e-3) and dip.layer_seconds(8) == pytest.approx(2e-3 + 2e-3 * 4 / 12)
    assert Calibration(((4, 2e-3), (8, 1e-3)), context=256, device="test").layer_seconds(64) == pytest.approx(1e-3)


def test_plan_cli_prints_a_table_and_writes_every_layouts_terms(tmp_path):
    out = invoke("plan", "--preset", "h100x4-nvlink", "--shape", "llama3-8b", "--batch", "1", "--json",
                 str(tmp_path / "plan.json"), "--verbose")
    assert out.exit_code == 0, out.output
    assert "tp4 x pp1" in out.stdout and "TP all-reduce" in out.stdout
    assert "ferry: recommended tp4 x pp1" in out.stderr
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["recommended"]["layout"]["tp"] == 4 and doc["model"]["layers"] == 32
    assert len(doc["layouts"]) == len(enumerate_layouts(LLAMA3_8B, preset("h100x4-nvlink")))
    terms = doc["layouts"][0]["decode_stages"][0]
    assert {"compute", "kv_read", "tp_allreduce", "pp_send", "lm_head", "embed", "overhead", "busy"} <= set(terms)
    rates = [round(lay["decode_tok_s"], 6) for lay in doc["layouts"] if lay["fits"]]  # ties: fewer devices first
    assert rates == sorted(rates, reverse=True)


def test_plan_cli_reads_a_hand_written_topology_and_a_checkpoints_config(tmp_path, smollm_path):
    topo = {"nodes": 2, "devices_per_node": 2, "device": {"name": "H100"},
            "intra_node": {"alpha_us": 4.9, "beta_GBps": 333}, "inter_node": {"alpha_us": 30, "beta_GBps": 3.1}}
    (tmp_path / "t.json").write_text(json.dumps(topo))
    out = invoke("plan", "--topology", str(tmp_path / "t.json"), "--model", str(smollm_path), "--json", "-")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)  # with --json - stdout is the JSON alone
    assert doc["model"]["name"] == smollm_path.name and doc["model"]["layers"] == 30
    assert doc["topology"]["nodes"] == 2 and doc["recommended"]["fits"]


@pytest.mark.slow
def test_plan_cli_live_on_this_cpu_and_calibrated():
    # Two CPU ranks: the layers timed on one rank's share of the cores, the pipeline's own cost on two real ranks.
    out = invoke("plan", "--shape", "tiny", "--device", "cpu", "--calibrate", "--batch", "2", "--prompt", "32",
                 "--output", "8", "--cpu-ranks", "2", "--json", "-")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["calibration"]["mode"] == "engine, eager" and doc["calibration"]["context"] == 32 + 8
    assert "ferry: a pipeline micro-batch's own cost:" in out.stderr and doc["params"]["pipeline_host_s"] >= 0
    assert {(p["layout"]["tp"], p["layout"]["pp"]) for p in doc["layouts"]} == {(1, 1), (2, 1), (1, 2)}
    assert doc["topology"]["details"]["cpu_ranks"] == 2


def test_plan_vs_measured_takes_each_cpu_layout_from_the_plan_of_its_rank_count():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_vs_measured.py"
    spec = importlib.util.spec_from_file_location("plan_vs_measured", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def entry(tp, pp, tok_s):
        return {"layout": {"tp": tp, "pp": pp, "split": [4 // pp] * pp, "micro_batches": pp}, "decode_tok_s": tok_s}

    def cpu_plan(ranks, entries):  # as plan.py's _as_cpu_ranks writes it
        return {"workload": {"batch": 8}, "layouts": entries,
                "topology": {"nodes": 1, "devices_per_node": ranks, "details": {"cpu_ranks": ranks}}}

    measured = {"results": [{"tp": tp, "pp": pp, "batch": 8, "link": "default", "aggregate_tokens_per_s": t}
                            for tp, pp, t in ((1, 1, 100.0), (2, 1, 80.0), (1, 2, 60.0))]}
    # The two-rank plan also lists one rank (on half the cores): that prediction is not the one-rank layout's.
    plans = [cpu_plan(2, [entry(1, 1, 50.0), entry(2, 1, 88.0), entry(1, 2, 66.0)]), cpu_plan(1, [entry(1, 1, 110.0)])]
    rows, summary = bench.compare(measured, plans)
    assert {r["layout"]: r["error"] for r in rows} == {"tp1xpp1": 0.1, "tp2xpp1": 0.1, "tp1xpp2": 0.1}
    assert summary["within_25_percent"] == 3 and summary["orders"][8]["predicted"] == ["tp1xpp1", "tp2xpp1", "tp1xpp2"]


def test_engine_calibration_splits_a_step_into_layers_and_a_fixed_part(monkeypatch):
    import torch

    import ferry.bench.decode_timing as timing
    from ferry.parallel.cost_model import time_engine_steps

    # The split's arithmetic on known step times (1 layer: 1 ms + 0.1 ms per row; 3 layers: 2 ms more), with one
    # run of each engine disturbed (a busy machine): a real engine runs, but the timing it reports is replaced,
    # since a unit test must not depend on this machine's load.
    calls = []

    def step_rate(engine, batch, prompt_len, new_tokens, vocab, repeats):
        layers = len(engine.model.layers)
        calls.append((layers, batch, prompt_len))
        slow = 5.0 if len(calls) in (3, 4) else 1.0  # the second turn of both engines at the first row count
        return 1.0 / (slow * (1e-3 + 1e-4 * batch + (2e-3 if layers == 3 else 0.0)))

    monkeypatch.setattr(timing, "ferry_decode", step_rate)
    cal = time_engine_steps(TINY, "cpu", torch.float32, token_counts=(1, 4), new_tokens=4, repeats=3, prompt_len=48)
    # The engines take turns (1, 3, 1, 3, ...) at the workload's prompt length; on a CPU the median drops the slow turn.
    assert [c[0] for c in calls] == [1, 3] * 6 and {c[2] for c in calls} == {48} and cal.context == 48 + 2
    assert cal.mode == "engine, eager"
    assert cal.layer_seconds(1) == pytest.approx(1e-3) and cal.layer_seconds(4) == pytest.approx(1e-3)
    assert cal.fixed_seconds(1) == pytest.approx(1e-4) and cal.fixed_seconds(4) == pytest.approx(4e-4)


def test_on_a_gpu_layers_come_from_graph_replays_and_a_step_is_the_longer_of_host_and_gpu(monkeypatch):
    import torch

    import ferry.bench.decode_timing as timing
    from ferry.parallel.cost_model import time_engine_steps

    # A GPU-like engine: its graphs take 0.1 ms + 0.14 ms a layer, its host 0.5 ms a step, and a step the longer
    # of the two (whole-step differences would say 2 and 6 layers cost the same).
    def gpu_ms(engine, batch, context):
        return 0.1 + 0.14 * len(engine.model.layers)

    def step_rate(engine, batch, prompt_len, new_tokens, vocab, repeats):
        return 1.0 / max(0.5e-3, gpu_ms(engine, batch, prompt_len) / 1e3)

    monkeypatch.setattr(timing, "ferry_decode", step_rate)
    monkeypatch.setattr(timing, "graph_step_ms", gpu_ms)
    cal = time_engine_steps(TINY, "cpu", torch.float32, token_counts=(1, 8), new_tokens=4, repeats=2)
    assert cal.mode.endswith("layers from graph replays")
    assert cal.layer_seconds(8) == pytest.approx(0.14e-3)
    gpu_fixed, host_floor = cal.overlapped(8)
    assert gpu_fixed == pytest.approx(0.1e-3) and host_floor == pytest.approx(0.5e-3)

    def one_device(layers):
        return predict(replace(TINY, num_layers=layers), cluster(1, 1), Layout(1, 1, 1, (layers,)),
                       Workload(8, 16, 8), calibration=cal).decode_stages[0]

    shallow, deep = one_device(1), one_device(32)
    assert shallow["busy"] == pytest.approx(0.5e-3) and shallow["host_wait"] > 0  # bound by the host
    assert deep["host_wait"] == 0 and deep["busy"] == pytest.approx(32 * 0.14e-3 + 0.1e-3)  # by the GPU
    # A pipeline's stages keep their own host term (pipeline_host_s), not the one-stage floor.
    pipe = predict(replace(TINY, num_layers=32), cluster(1, 2), Layout(1, 2, 2, (16, 16)), Workload(8, 16, 8),
                   calibration=cal)
    assert all("host_wait" not in s for s in pipe.decode_stages)


def test_a_measured_pipeline_cost_is_what_the_run_exceeds_the_model_by(monkeypatch):
    import ferry.bench.pp_speed as pp_speed
    from ferry.parallel.cost_model import time_pipeline_host

    cal = Calibration(((1, 1e-3), (4, 2e-3)), context=32, device="test", fixed_by_tokens=((1, 1e-4), (4, 2e-4)))
    topo = cluster(1, 2)
    jobs = []
    modelled = predict(replace(TINY, num_layers=2), topo, Layout(1, 2, 2, (1, 1)), Workload(8, 32, 16),
                       CostParams(dtype_bytes=4, pipeline_host_s=0.0), cal).tpot_s

    def run_layout(job, device_type):
        jobs.append(job)
        return {"rows": [{"tokens_per_s": 1.0 / (modelled + 3e-3)}]}  # 3 ms over the model: 1.5 ms a micro-batch

    monkeypatch.setattr(pp_speed, "run_layout", run_layout)
    host_s, run = time_pipeline_host(TINY, "float32", 8, 32, cal, topo)
    job = jobs[0]
    assert (job.tp, job.pp, job.micro_batches, job.config.num_layers, job.batches) == (1, 2, 2, 2, (8,))
    assert host_s == pytest.approx(1.5e-3) and run["modelled_cycle_s"] == pytest.approx(modelled)
    # A run faster than the model costs nothing (never a negative term).
    monkeypatch.setattr(pp_speed, "run_layout", lambda job, kind: {"rows": [{"tokens_per_s": 2.0 / modelled}]})
    assert time_pipeline_host(TINY, "float32", 8, 32, cal, topo)[0] == 0.0


@pytest.mark.parametrize("args, message", [
    (["--preset", "h100x4-nvlink", "--tp", "3"], "ferry: error: --tp 3 neither divides"),
    (["--preset", "nope"], "ferry: error: unknown topology preset 'nope'"),
    (["--shape", "gpt5"], "ferry: error: unknown --shape 'gpt5'"),
    (["--topology", "/no/such.json"], "ferry: error: topology file '/no/such.json' does not exist"),
    (["--preset", "h100x4-nvlink", "--topology", "live"], "ferry: error: give --topology or --preset, not both"),
    (["--preset", "h100x4-nvlink", "--dtype", "int3"], "ferry: error: unknown --dtype 'int3'"),
])
def test_plan_cli_bad_input_is_one_line_and_exit_2(args, message):
    out = invoke("plan", *args)
    assert out.exit_code == 2 and out.stderr.startswith(message), out.output
    assert len(out.stderr.strip().splitlines()) == 1


def test_plan_and_topo_help_read_as_typed():
    for command in ("plan", "topo"):
        out = invoke(command, "--help")
        assert out.exit_code == 0 and f"{command} [OPTIONS]" in out.stdout  # CliRunner names the program "root"
        assert "<bool>" not in out.stdout and "--json" in out.stdout
