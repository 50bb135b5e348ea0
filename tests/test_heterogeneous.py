"""Heterogeneous placements on CPU: ranks of unequal speed are processes with one thread each, one of them slowed
2x (every matmul run twice). Measured-speed pipeline splits, weighted tensor-parallel shards and stages in different
dtypes give the tokens of one rank; placements that cannot run are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from tie_rule import worst_gap

from ferry.device import backend_for, present_devices
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError
from ferry.model.layers.heads import HeadShard
from ferry.model.layers.shard import shard_sizes
from ferry.parallel.device_speed import DeviceSpeed, balance_layers, split_by_speed, tp_shares
from ferry.parallel.launch import spawn
from ferry.parallel.pipeline_stage import Hop
from ferry.parallel.placement import parse_stages, placement_from_json, placement_from_options
from ferry.parallel.tp_generate import GenerateJob, PipelineSpec, run_generate

# Held out: none of these appear in other tests' prompts.
PROMPTS = ("Rivers carry sediment to", "My favourite board game is", "SELECT name FROM")
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
ONE_THREAD = {"device": "cpu", "threads": 1}
SLOWED = {"device": "cpu", "threads": 1, "slowdown": 2}
BF16_TIE_LOGITS = 0.5  # a bf16 stage's token must be within this of the fp32 model's top logit (tests/test_gpu.py)


@pytest.fixture(scope="module")
def reference_tokens(ferry_smollm):
    ids = [ferry_smollm.tokenizer.encode(p) for p in PROMPTS]
    return [c.token_ids for c in Engine(ferry_smollm.model, ferry_smollm.tokenizer).generate(ids, GREEDY)]


@pytest.fixture(scope="module")
def speed_cache(tmp_path_factory):
    """One measurement cache for the module: the second test that needs a device's speed reads the first's."""
    return tmp_path_factory.mktemp("ferry_cache")


def _run(smollm_path, placement_doc: dict, monkeypatch, cache, pp: int | None) -> dict:
    monkeypatch.setenv("FERRY_CACHE", str(cache))  # the spawned ranks inherit it
    placement = placement_from_json(placement_doc, "test")
    job = GenerateJob(str(smollm_path), "cpu", "fp32", PROMPTS, GREEDY,
                      pipeline=PipelineSpec(pp, timeout_s=120) if pp else None, placement=placement)
    return spawn(placement.world, "cpu", run_generate, (job,), timeout_s=120, placement=placement)


@pytest.mark.slow
def test_a_pipeline_sized_by_measured_speed_gives_the_slowed_stage_fewer_layers(smollm_path, reference_tokens,
                                                                                monkeypatch, speed_cache):
    doc = {"stages": [{"ranks": [ONE_THREAD]}, {"ranks": [SLOWED]}]}
    result = _run(smollm_path, doc, monkeypatch, speed_cache, pp=2)
    assert [c["token_ids"] for c in result["completions"]] == reference_tokens
    split = result["speed_split"]
    fast, slow = split["speeds"]
    # The emulated slow device measures slower: its matmuls (timed alone, a median) and its LM head. (A layer's time
    # is a difference of two short timings: on a busy machine too noisy to assert a ratio on.)
    assert slow["mlp_matmul_ms"] > 1.2 * fast["mlp_matmul_ms"] and slow["fixed_ms"] > 1.2 * fast["fixed_ms"], split
    first, last = split["layer_counts"]
    # The slowed last stage, which also runs the LM head, gets fewer layers than an even split's 15.
    assert first + last == 30 and last < 15, split
    assert [first, last] == balance_layers([fast["layer_ms"], slow["layer_ms"]], [0.0, slow["fixed_ms"]], 30)
    assert result["stages"] == [f"layers 0..{first - 1}", f"layers {first}..29"]


@pytest.mark.slow
def test_weighted_tensor_parallel_shards_follow_measured_speed_and_keep_the_tokens(smollm_path, reference_tokens,
                                                                                   monkeypatch, speed_cache):
    doc = {"stages": [{"ranks": [ONE_THREAD, SLOWED], "shares": "auto"}]}
    result = _run(smollm_path, doc, monkeypatch, speed_cache, pp=None)
    assert [c["token_ids"] for c in result["completions"]] == reference_tokens
    fast, slow = result["tp_shares"]
    assert fast == 1.0 and slow < 1.0, result["tp_shares"]


@pytest.mark.slow
def test_stages_in_different_dtypes_convert_at_the_crossing(ferry_smollm, smollm_path, monkeypatch, speed_cache):
    """bf16 stage first, fp32 after: the message travels in bf16 (the narrower) and the receiver widens it."""
    doc = {"stages": [{"ranks": [ONE_THREAD], "layers": 12, "dtype": "bf16"},
                      {"ranks": [ONE_THREAD], "layers": 18, "dtype": "fp32"}]}
    result = _run(smollm_path, doc, monkeypatch, speed_cache, pp=2)
    assert result["stage_dtypes"] == ["bf16", "fp32"]
    tokens = sum(len(ferry_smollm.tokenizer.encode(p)) for p in PROMPTS) + len(PROMPTS) * (GREEDY.max_tokens - 1)
    assert result["hidden_bytes_sent_per_rank"] == [tokens * ferry_smollm.config.hidden_size * 2, 0]
    for prompt, c in zip(PROMPTS, result["completions"], strict=True):
        assert worst_gap(ferry_smollm, ferry_smollm.tokenizer.encode(prompt), c["token_ids"]) <= BF16_TIE_LOGITS

def test_weighted_shard_sizes_are_proportional_cover_everything_and_even_by_default():
    assert shard_sizes(9, 2) == shard_sizes(9, 2, (1.0, 1.0)) == [5, 4]
    assert shard_sizes(30, 2, (2, 1)) == [20, 10]
    assert shard_sizes(1536, 2, (1, 3)) == [384, 1152]
    assert shard_sizes(3, 3, (100, 1, 1)) == [1, 1, 1]  # every rank keeps a unit
    for total, weights in ((49152, (1, 0.7)), (7, (0.3, 0.3, 0.4)), (14336, (1, 0.5, 0.5, 0.25))):
        sizes = shard_sizes(total, len(weights), weights)
        assert sum(sizes) == total and min(sizes) >= 1
        assert all(abs(s - total * w / sum(weights)) <= 1 for s, w in zip(sizes, weights, strict=True))


def test_weighted_heads_cut_kv_groups_by_share():
    # SmolLM2: 9 query heads in 3 KV groups. Shares 1:2 give rank 0 one group and rank 1 two.
    a, b = (HeadShard.for_rank(9, 3, 2, r, (1.0, 2.0)) for r in range(2))
    assert (a.kv_start, a.kv_stop, a.q_start, a.q_stop) == (0, 1, 0, 3)
    assert (b.kv_start, b.kv_stop, b.q_start, b.q_stop) == (1, 3, 3, 9)


def test_layers_are_balanced_so_stages_finish_together():
    assert balance_layers([1.0, 1.0], [0.0, 0.0], 30) == [15, 15]
    assert balance_layers([1.0, 2.0], [0.0, 0.0], 30) == [20, 10]
    assert balance_layers([1.0, 1.0], [0.0, 8.0], 30) == [19, 11]  # the LM head weighs 8 layers
    counts = balance_layers([0.05, 1.0], [0.0, 0.5], 32)  # a GPU and a CPU: the CPU keeps one layer
    assert counts == [31, 1]
    assert tp_shares([1.0, 2.0]) == (1.0, 0.5)
    assert tp_shares([1.0, 1.03]) == (1.0, 1.0)  # noise is no speed difference


def test_split_by_speed_uses_every_ranks_measurement():
    placement = placement_from_json({"stages": [{"ranks": [ONE_THREAD, ONE_THREAD], "shares": "auto"},
                                                {"ranks": [ONE_THREAD, ONE_THREAD]}]}, "test")
    speeds = [DeviceSpeed("a", 1.0, 0.0, 8), DeviceSpeed("b", 2.0, 0.0, 8),
              DeviceSpeed("c", 1.0, 0.0, 8), DeviceSpeed("d", 1.0, 0.0, 8)]
    split = split_by_speed(placement, 30, speeds)
    assert split.shares == ((1.0, 0.5), None)
    # Stage 0 weighted: 1 / (1/1 + 1/2) = 0.667 s a layer; stage 1 even: 1.0 / 2 = 0.5 s.
    assert split.layer_counts == (13, 17)


def test_a_hop_travels_in_the_narrower_dtype_and_crosses_the_host_only_between_kinds():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert Hop.between(gpu, torch.bfloat16, cpu, torch.float32).wire_dtype == torch.bfloat16
    assert Hop.between(cpu, torch.float32, gpu, torch.bfloat16).wire_dtype == torch.bfloat16
    assert Hop.between(cpu, torch.float16, cpu, torch.bfloat16).wire_dtype == torch.bfloat16  # tie: the receiver's
    assert Hop.between(gpu, torch.bfloat16, cpu, torch.float32).via_host
    assert not Hop.between(cpu, torch.float32, cpu, torch.float32).via_host
    assert not Hop.between(gpu, torch.bfloat16, torch.device("cuda", 1), torch.bfloat16).via_host


def test_stages_short_form_and_refusals(tmp_path):
    placement = parse_stages("cpu=10,cpu=20")
    assert (placement.pp, placement.tp, placement.layer_split, placement.measured_split) == (2, 1, "10,20", False)
    assert parse_stages("cpu,cpu").measured_split
    absent = "cuda:0" if "cuda:0" not in present_devices() else "cuda:99"
    with pytest.raises(FerryError, match=rf"device '{absent}' is not present; this machine has cpu"):
        parse_stages(f"{absent}=20,cpu=10")
    with pytest.raises(FerryError, match="unknown device 'tpu"):
        parse_stages("tpu:0=20,cpu=10")
    with pytest.raises(FerryError, match="give every stage a layer count, or none"):
        parse_stages("cpu=20,cpu")
    with pytest.raises(FerryError, match="not a layer count"):
        parse_stages("cpu=x,cpu=3")
    with pytest.raises(FerryError, match="one rank needs no placement"):
        parse_stages("cpu=30")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FerryError, match="not valid JSON"):
        parse_stages(str(bad))
    mixed_tp = tmp_path / "tp.json"
    mixed_tp.write_text(json.dumps({"stages": [{"ranks": [ONE_THREAD, ONE_THREAD]}, {"ranks": [ONE_THREAD]}]}))
    with pytest.raises(FerryError, match="every stage needs the same tensor-parallel degree"):
        parse_stages(str(mixed_tp))
    with pytest.raises(FerryError, match="unknown rank field"):
        placement_from_json({"stages": [{"ranks": [{"device": "cpu", "speed": 2}]}, {"ranks": [ONE_THREAD]}]}, "x")
    with pytest.raises(FerryError, match="one positive weight per rank"):
        placement_from_json({"stages": [{"ranks": [ONE_THREAD, ONE_THREAD], "shares": [1]}]}, "x")
    with pytest.raises(FerryError, match="drop --tp"):
        placement_from_options("cpu,cpu", None, None, 2, None, None)
    with pytest.raises(FerryError, match="needs --tp 2 or more"):
        placement_from_options(None, "2,1", "cpu", 1, None, None)
    assert placement_from_options(None, "2,1", "cpu", 2, None, None).stages[0].shares == (2.0, 1.0)
    assert backend_for(["cpu"]) == "gloo" and backend_for({"cuda"}) == "nccl"
    with pytest.raises(FerryError, match="no torch.distributed backend known for device type 'tpu'"):
        backend_for(["tpu"])



GPU_LAYER = DeviceSpeed("cuda:0", 0.2e-3, 0.36e-3, 8)  # Llama-3-8B shape on an H200 (hetero_gpu-cpu result)
CPU_LAYER = DeviceSpeed("cpu", 7.0e-3, 8.4e-3, 8)  # and on its host's 31 cores


def test_the_layers_beyond_a_gpu_budget_stream_at_large_batches_and_run_on_the_cpu_at_small_ones():
    from ferry.bench.shapes import SHAPES
    from ferry.parallel.offload_plan import choose, gpu_layers_within, parse_size

    config, budget = SHAPES["llama3-8b"], parse_size("12GiB")
    assert gpu_layers_within(config, 2, budget) == 21
    small = choose(config, 2, budget, 1, GPU_LAYER, CPU_LAYER, 55e9)
    large = choose(config, 2, budget, 16, GPU_LAYER, CPU_LAYER, 55e9)
    assert (small.way, large.way) == ("cpu-stage", "stream"), (small.why, large.why)
    assert small.stages == "cpu=11,cuda:0=21"  # the host runs the first layers; the GPU keeps the LM head
    assert choose(config, 2, parse_size("40GiB"), 1, None, None, None).way == "fits"
    with pytest.raises(FerryError, match="does not hold the embedding and LM head"):
        gpu_layers_within(config, 2, parse_size("2GiB"))
    with pytest.raises(FerryError, match="give a size such as 24GiB"):
        parse_size("lots")


def test_plan_over_a_gpu_and_a_cpu_puts_the_lm_head_on_the_gpu_and_balances_for_throughput():
    from ferry.bench.shapes import SHAPES
    from ferry.parallel.placement_plan import plan_placed

    config = SHAPES["llama3-8b"]
    speeds = {"cuda:0": GPU_LAYER, "cpu": CPU_LAYER}
    sizes, limits = {"cuda:0": 2, "cpu": 2}, {"cuda:0": 140 * 2**30, "cpu": 200 * 2**30}
    plans = plan_placed(config, ["cuda:0", "cpu"], speeds, sizes, limits, batch=16, micro_batches=2, h2d_Bps=55e9)
    best = plans[0]
    assert best.devices == ("cpu", "cuda:0") and best.split[0] == 1, best
    even = next(p for p in plans if p.split == (16, 16) and p.devices == ("cuda:0", "cpu"))
    assert best.decode_tok_s > 5 * even.decode_tok_s
    kept = plan_placed(config, ["cuda:0", "cpu"], speeds, sizes, limits, 16, 2, 55e9, keep_order=True)
    assert {p.devices for p in kept} == {("cuda:0", "cpu")}
    tight = {"cuda:0": 8 * 2**30, "cpu": 200 * 2**30}  # 17 layers (0.41 GiB each) beside the LM head's 0.98 GiB
    fitting = plan_placed(config, ["cuda:0", "cpu"], speeds, sizes, tight, 1, 2, 55e9)[0]
    assert fitting.fits and fitting.split[fitting.devices.index("cuda:0")] == 17, fitting
