"""Tensor parallelism on CPU with gloo: tp=2 and tp=3 (uneven head splits) match tp=1, layouts that cannot
work are refused by name, and a rank that dies ends the run promptly with no processes left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError
from ferry.parallel.launch import free_port, spawn
from ferry.parallel.layout import check_device_count, check_tensor_parallel
from ferry.bench.tp_quality import compare, full_logits_on_ranks
from ferry.parallel.tp_generate import GenerateJob, run_generate

PROMPTS = ("The capital of France is", "def add(a, b):", "Once upon a time, in a quiet village,",
           "List three colours:", "Water freezes at", "My favourite book is")
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("tp", [2, 3])
def test_tp_logits_match_tp1_within_fp32_tolerance(ferry_smollm, smollm_path, tp):
    ids = [ferry_smollm.tokenizer.encode("Tensor parallel ranks each hold a slice of every layer.")]
    x = torch.tensor(ids)
    from ferry.engine.kv_cache import KVCache

    cfg = ferry_smollm.config
    cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    cache.ensure(*x.shape)
    with torch.inference_mode():
        ref = ferry_smollm.model.full_logits(x, cache.layers)
    ours = spawn(tp, "cpu", full_logits_on_ranks, (str(smollm_path), ids))
    err = float((ours - ref).abs().max())
    print(f"tp={tp}: max |logit error| vs tp=1 = {err:.2e}")
    assert err < 1e-3  # same fp32 maths, different summation order across ranks


@pytest.mark.parametrize("tp", [2, 3])
def test_tp_greedy_tokens_match_tp1(ferry_smollm, smollm_path, tp):
    ids = [ferry_smollm.tokenizer.encode(p) for p in PROMPTS]
    reference = [c.token_ids for c in Engine(ferry_smollm.model, ferry_smollm.tokenizer).generate(ids, GREEDY)]
    result = spawn(tp, "cpu", run_generate, (GenerateJob(str(smollm_path), "cpu", None, PROMPTS, GREEDY),))
    assert [c["token_ids"] for c in result["completions"]] == reference
    assert len(result["peak_host_mb_per_rank"]) == tp


def test_layouts_that_cannot_work_are_refused_by_name(ferry_smollm):
    check_tensor_parallel(ferry_smollm.config, 3)
    with pytest.raises(FerryError, match="3 KV heads"):
        check_tensor_parallel(ferry_smollm.config, 4)
    with pytest.raises(FerryError, match="needs 4 cuda devices, but 2 are present"):
        check_device_count("cuda", 4, 2)


def test_tp_on_cuda_without_gpus_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, "-m", "ferry.cli", "generate", "x", "--tp", "2", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA device" in out.stderr and "Traceback" not in out.stderr


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_killing_one_rank_ends_the_run_quickly_with_no_processes_left():
    proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", "generate", "Tell me a long story.", "--tp", "2",
                             "--device", "cpu", "--max-tokens", "4000", "--ignore-eos"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ranks: set[int] = set()
        deadline = time.time() + 60
        while time.time() < deadline and len(ranks) < 2:
            ranks = {c for c in _children(proc.pid) if "ferry-rank" in Path(f"/proc/{c}/comm").read_text()
                     or "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()} if _alive(proc.pid) else set()
            time.sleep(0.2)
        assert len(ranks) >= 2, "ranks did not start"
        time.sleep(6)  # let them load and start decoding
        victim = max(ranks)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        _, stderr = proc.communicate(timeout=90)
        assert proc.returncode != 0
        assert time.time() - killed_at < 60
        assert "rank" in stderr and "Traceback" not in stderr.split("ferry: error:")[-1]
        time.sleep(1)
        assert not [pid for pid in ranks if _alive(pid)], "orphan rank processes left"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_int8_compressed_allreduce_stays_close_to_the_exact_path(ferry_smollm, smollm_path):
    """Off by default; when on, teacher-forced agreement and perplexity on the shipped text stay close."""
    from ferry.bench.edge_codecs import eval_text

    ids = [ferry_smollm.tokenizer.encode(eval_text())[:192]]
    exact = spawn(2, "cpu", full_logits_on_ranks, (str(smollm_path), ids))
    compressed = spawn(2, "cpu", full_logits_on_ranks, (str(smollm_path), ids), compression="int8")
    quality = compare(exact, compressed, ids)
    print(f"int8 all-reduce vs exact (tp=2): {quality}")
    assert 0 < quality["max_logit_error"]  # the compressed path really ran
    assert quality["top1_agreement"] >= 0.95
    assert abs(quality["perplexity_variant"] - quality["perplexity_exact"]) / quality["perplexity_exact"] < 0.05


def test_the_same_command_runs_under_torchrun(ferry_smollm):
    import json
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not installed")
    out = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "ferry.cli", "generate",
                          PROMPTS[0], "--device", "cpu", "--max-tokens", "12", "--ignore-eos", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)  # only rank 0 printed
    ids = [ferry_smollm.tokenizer.encode(PROMPTS[0])]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    reference = Engine(ferry_smollm.model, ferry_smollm.tokenizer).generate(ids, params)[0].token_ids
    assert doc["tp"] == 2 and doc["completions"][0]["token_ids"] == reference
