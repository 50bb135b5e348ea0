"""A GPU and the host in one pipeline (a GPU device machine; skipped elsewhere): stages on cuda:0 and the cpu, in
their own dtypes, give the fp32 model's tokens under the tie rule; a measured split gives the GPU most layers; a GPU
memory budget too small for the model streams the rest or runs it as a CPU stage, as asked, and says which.

The GPU and the CPU run different kernels, so even in fp32 their sums differ in the last bits: every token must be
within a margin of the fp32 model's top logit, teacher-forced on the path's own prefix (tests/tie_rule.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tie_rule import worst_gap

from ferry.engine.sampling import SamplingParams
from ferry.parallel.launch import spawn
from ferry.parallel.placement import parse_stages
from ferry.parallel.tp_generate import GenerateJob, PipelineSpec, run_generate

pytestmark = pytest.mark.gpu
PROMPTS = ("The oldest known map shows", "Three facts about octopuses:", "for i in range(10):")
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
FP32_TIE_LOGITS = 0.05
BF16_TIE_LOGITS = 0.5


@pytest.fixture(autouse=True)
def _needs_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _run(smollm_path, stages: str, dtype: str | None) -> dict:
    placement = parse_stages(stages)
    job = GenerateJob(str(smollm_path), "cuda", dtype, PROMPTS, GREEDY,
                      pipeline=PipelineSpec(placement.pp, timeout_s=300), placement=placement)
    return spawn(placement.world, "cuda", run_generate, (job,), timeout_s=300, placement=placement)


def _check_ties(ferry_smollm, completions, margin: float) -> None:
    for prompt, c in zip(PROMPTS, completions, strict=True):
        gap = worst_gap(ferry_smollm, ferry_smollm.tokenizer.encode(prompt), c["token_ids"])
        assert gap <= margin, (prompt, gap)


def test_a_gpu_stage_then_a_cpu_stage_in_fp32_give_the_fp32_tokens(ferry_smollm, smollm_path):
    result = _run(smollm_path, "cuda:0=18,cpu=12", "fp32")
    assert result["device"] == "cuda+cpu" and result["stage_dtypes"] == ["fp32", "fp32"]
    _check_ties(ferry_smollm, result["completions"], FP32_TIE_LOGITS)
    gpu, cpu = result["stage_times_per_rank"]
    assert gpu["steps"] > 0 and cpu["compute_ms"] > 0


def test_a_cpu_stage_then_a_gpu_stage_in_their_own_dtypes(ferry_smollm, smollm_path):
    result = _run(smollm_path, "cpu=8,cuda:0=22", None)
    assert result["stage_dtypes"][1] == "bf16"
    _check_ties(ferry_smollm, result["completions"], BF16_TIE_LOGITS)
    # The message travels in the narrower dtype: bf16 (2 bytes a value) whatever the CPU stage computes in.
    tokens = sum(len(ferry_smollm.tokenizer.encode(p)) for p in PROMPTS) + len(PROMPTS) * (GREEDY.max_tokens - 1)
    assert result["hidden_bytes_sent_per_rank"] == [tokens * ferry_smollm.config.hidden_size * 2, 0]


def test_a_measured_split_gives_the_gpu_most_layers(ferry_smollm, smollm_path):
    result = _run(smollm_path, "cuda:0,cpu", None)
    gpu_layers, cpu_layers = result["speed_split"]["layer_counts"]
    assert gpu_layers > cpu_layers and gpu_layers + cpu_layers == 30, result["speed_split"]
    _check_ties(ferry_smollm, result["completions"], BF16_TIE_LOGITS)


@pytest.mark.parametrize("way", ["stream", "cpu"])
def test_a_gpu_memory_budget_streams_or_runs_a_cpu_stage_as_asked(ferry_smollm, way):
    # 0.2 GiB holds SmolLM2's tables and about 19 of its 30 bf16 layers.
    out = subprocess.run([sys.executable, "-m", "ferry.cli", "generate", *PROMPTS, "--max-tokens", "16",
                          "--ignore-eos", "--gpu-memory", "0.2GiB", "--offload", way, "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    said = "streaming them" if way == "stream" else "a CPU stage, --stages cpu="
    assert said in out.stderr and f"{way} forced" in out.stderr
    _check_ties(ferry_smollm, json.loads(out.stdout)["completions"], BF16_TIE_LOGITS)


@pytest.mark.parametrize("shares", ["2,1", "auto"])
def test_weighted_tensor_parallelism_on_two_gpus(ferry_smollm, smollm_path, shares):
    """Uneven shards (heads, FFN columns, vocabulary) under CUDA graphs and the all-reduce engine; two GPUs of one
    kind measure alike, so `auto` keeps the even split."""
    from ferry.parallel.placement import placement_from_options

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    placement = placement_from_options(None, shares, "cuda", 2, None, None)
    job = GenerateJob(str(smollm_path), "cuda", "fp32", PROMPTS, GREEDY, placement=placement)
    result = spawn(2, "cuda", run_generate, (job,), timeout_s=300, placement=placement)
    assert result["tp_shares"] == ([2.0, 1.0] if shares == "2,1" else [1.0, 1.0]), result["tp_shares"]
    _check_ties(ferry_smollm, result["completions"], FP32_TIE_LOGITS)


def test_two_gpu_stages_and_a_cpu_stage_mix_nccl_and_the_host(ferry_smollm, smollm_path):
    """cuda:0 -> cuda:1 over a pair group of NCCL inside a gloo world, then cuda:1 -> cpu through the host."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    result = _run(smollm_path, "cuda:0=12,cuda:1=12,cpu=6", "fp32")
    assert result["stages"] == ["layers 0..11", "layers 12..23", "layers 24..29"]
    _check_ties(ferry_smollm, result["completions"], FP32_TIE_LOGITS)
