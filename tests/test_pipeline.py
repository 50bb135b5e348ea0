"""Pipeline parallelism on CPU with gloo: PP=2, PP=3 (uneven) and TP=2 x PP=2 give the tokens of one rank; each
stage holds only its layers; layouts and options that cannot work are refused by name."""

from __future__ import annotations

import json
import os
import re
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
from ferry.model.llama import LayerSpan
from ferry.model.loader import load_model
from ferry.parallel.launch import free_port, spawn
from ferry.parallel.layout import check_pipeline_options, stage_spans
from ferry.parallel.mesh import Mesh, StagePeers, mesh_under_torchrun
from ferry.parallel.tp_generate import GenerateJob, PipelineSpec, run_generate

# Held out: none of these appear in other tests' prompts.
PROMPTS = ("Pipelines move water from", "The three primary colours are", "import numpy as np\n",
           "A good breakfast includes", "The tallest mountain on Earth")
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference_tokens(ferry_smollm):
    ids = [ferry_smollm.tokenizer.encode(p) for p in PROMPTS]
    return [c.token_ids for c in Engine(ferry_smollm.model, ferry_smollm.tokenizer).generate(ids, GREEDY)]


@pytest.mark.slow
@pytest.mark.parametrize(("world", "pp", "split"), [(3, 3, "6,14,10"), (4, 2, None)], ids=["pp3-uneven", "tp2xpp2"])
def test_pipeline_greedy_tokens_match_one_rank(ferry_smollm, smollm_path, reference_tokens, world, pp, split):
    job = GenerateJob(str(smollm_path), "cpu", "fp32", PROMPTS, GREEDY,
                      pipeline=PipelineSpec(pp, layer_split=split, timeout_s=120))
    result = spawn(world, "cpu", run_generate, (job,), timeout_s=120)
    assert [c["token_ids"] for c in result["completions"]] == reference_tokens
    tp = world // pp
    assert (result["tp"], result["pp"], result["micro_batches"]) == (tp, pp, pp)
    # Each token run crosses each stage boundary once as fp32 hidden states (prompts, then every output token but
    # the last), split over the stage's TP ranks; the last stage sends none (it sends tokens back instead).
    tokens = sum(len(ferry_smollm.tokenizer.encode(p)) for p in PROMPTS) + len(PROMPTS) * (GREEDY.max_tokens - 1)
    boundary_bytes = tokens * ferry_smollm.config.hidden_size * 4
    sent = result["hidden_bytes_sent_per_rank"]
    assert sent == [boundary_bytes // tp] * (world - tp) + [0] * tp


def test_a_stage_holds_only_its_layers(smollm_path, ferry_smollm):
    middle = load_model(smollm_path, torch.device("cpu"), torch.float32, show_progress=False,
                        span=LayerSpan(10, 20, 30)).model
    held = [i for i, layer in enumerate(middle.layers) if not layer.mlp.down_proj.weight.is_meta]
    assert held == list(range(10, 20))
    assert middle.embed_tokens.weight.is_meta  # neither first stage nor a tied head's
    last = load_model(smollm_path, torch.device("cpu"), torch.float32, show_progress=False,
                      span=LayerSpan(20, 30, 30)).model
    assert not last.embed_tokens.weight.is_meta  # SmolLM2 ties its head to the embedding table
    stage_bytes = sum(p.numel() * p.element_size() for p in middle.parameters() if not p.is_meta)
    whole_bytes = sum(p.numel() * p.element_size() for p in ferry_smollm.model.parameters())
    assert stage_bytes < 0.4 * whole_bytes  # a third of the layers and no embedding table


def test_stage_spans_even_given_and_refused():
    assert [(s.start, s.stop) for s in stage_spans(30, 4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    spans = stage_spans(32, 3, "10,10,12")
    assert [(s.start, s.stop, s.first, s.last) for s in spans] == [(0, 10, True, False), (10, 20, False, False),
                                                                  (20, 32, False, True)]
    with pytest.raises(FerryError, match="has 2 stages; --pp is 3"):
        stage_spans(32, 3, "16,16")
    with pytest.raises(FerryError, match="add up to the model's 32 layers"):
        stage_spans(32, 2, "16,17")
    with pytest.raises(FerryError, match="every stage needs a layer"):
        stage_spans(32, 2, "0,32")
    with pytest.raises(FerryError, match="one layer count per stage"):
        stage_spans(32, 2, "16;16")
    with pytest.raises(FerryError, match="more stages than the model's 4 layers"):
        stage_spans(4, 5)


def test_torchrun_layout_defaults_to_tp_in_node_and_pp_across():
    assert mesh_under_torchrun(None, None, world=8, local_world=4) == Mesh(tp=4, pp=2)
    assert mesh_under_torchrun(None, None, world=2, local_world=2) == Mesh(tp=2, pp=1)
    assert mesh_under_torchrun(None, 4, world=8, local_world=4) == Mesh(tp=2, pp=4)
    assert mesh_under_torchrun(8, None, world=8, local_world=4) == Mesh(tp=8, pp=1)
    assert mesh_under_torchrun(1, None, world=8, local_world=4) == Mesh(tp=1, pp=8)  # a given --tp 1 holds
    with pytest.raises(FerryError, match="--tp 3 x --pp 2 must be 8"):
        mesh_under_torchrun(3, 2, world=8, local_world=4)
    with pytest.raises(FerryError, match="--tp 1 x --pp 4 must be 8"):
        mesh_under_torchrun(1, 4, world=8, local_world=4)


def test_stage_peers_route_hidden_states_forward_and_tokens_back():
    mesh = Mesh(tp=2, pp=3)  # ranks 0,1 | 2,3 | 4,5
    middle = StagePeers(mesh, rank=3)
    assert (middle.stage, middle.previous, middle.next, middle.token_source) == (1, 1, 5, 5)
    assert StagePeers(mesh, rank=4).token_receivers() == [0, 2]


def test_pipeline_only_options_are_refused_without_a_pipeline_and_back():
    with pytest.raises(FerryError, match="--layer-split .* needs --pp 2"):
        check_pipeline_options(1, "10,20", None, False, False)
    with pytest.raises(FerryError, match="--micro-batches .* needs --pp 2"):
        check_pipeline_options(1, None, 4, False, False)
    with pytest.raises(FerryError, match="--compile is not offered with --pp"):
        check_pipeline_options(2, None, None, True, False)
    with pytest.raises(FerryError, match="--weights int8 is not offered with --pp"):
        check_pipeline_options(2, None, None, False, False, weights="int8")
    with pytest.raises(FerryError, match="--micro-batches must be 1 or more"):
        check_pipeline_options(2, None, 0, False, False)


def _torchrun_node(port: int, marker: str, extra: list[str], timeout: float = 30) -> subprocess.Popen:
    """One "node" of a two-node torchrun job on this machine (c10d rendezvous on 127.0.0.1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", marker,
           "-m", "ferry.cli", "generate", "--dtype", "fp32", "--timeout", str(timeout), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers_of(marker: str) -> list[int]:
    """PIDs of the ferry worker processes whose command line carries `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ferry.cli" in cmdline and marker.encode() in cmdline and b"torch.distributed.run" not in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_two_torchrun_nodes_give_the_tokens_of_one_rank(reference_tokens):
    port = free_port()
    nodes = [_torchrun_node(port, "two-nodes", ["--json", "--max-tokens", "12", "--ignore-eos", *PROMPTS[:2]])
             for _ in range(2)]
    outs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    docs = [json.loads(out) for out, _ in outs if out.strip()]
    assert len(docs) == 1  # rank 0 prints
    doc = docs[0]
    assert (doc["tp"], doc["pp"]) == (1, 2)  # one process per node: a pipeline stage per node
    assert [c["token_ids"] for c in doc["completions"]] == reference_tokens[:2]


@pytest.mark.slow
def test_a_node_that_dies_ends_the_other_with_the_rank_named():
    port, marker = free_port(), f"dying-node-{os.getpid()}"
    nodes = [_torchrun_node(port, marker, ["--max-tokens", "4000", "--ignore-eos", marker]) for _ in range(2)]
    try:
        deadline = time.monotonic() + 90
        while len(workers := _workers_of(marker)) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.5)
        time.sleep(3)  # past loading, into decoding
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.monotonic()
        errs = [node.communicate(timeout=60)[1] for node in nodes]
        ended_in = time.monotonic() - killed_at
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(node.returncode != 0 for node in nodes)
    assert ended_in < 30, f"the surviving node took {ended_in:.0f} s to stop"
    assert any(re.search(r"waiting for .* from rank \d failed, that rank died or stopped", e) for e in errs), errs
    time.sleep(1)
    assert _workers_of(marker) == [], "a worker outlived its job"


@pytest.mark.slow
def test_a_pp2_server_keeps_its_stages_in_step_across_joining_and_aborted_requests(ferry_smollm):
    """`ferry serve --pp 2` on CPU: requests that join between ticks, an abort and unseeded sampling all reach
    every stage at the same point of its micro-batch; greedy answers equal one rank's."""
    from serve_process import ServeProcess, check_ranks_stay_in_step

    tok = ferry_smollm.tokenizer
    reference = Engine(ferry_smollm.model, tok, kv_memory="0.25GiB")
    expected = {i: reference.generate([tok.encode(p)], SamplingParams(max_tokens=8))[0].text
                for i, p in enumerate(PROMPTS[:4])}
    server = ServeProcess("--pp", "2", "--device", "cpu", "--served-model-name", "smollm")
    try:
        check_ranks_stay_in_step(server, list(PROMPTS), expected)
        assert server.metric('ferry_link_bytes_total{link="pipeline_hidden"}') > 0
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_python_api_pp2_serves_request_after_request(ferry_smollm, smollm_path, reference_tokens):
    """Greedy, streamed and seeded-sampled requests one after another on two stages of three micro-batches."""
    from ferry.api import LLM

    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    ids = [ferry_smollm.tokenizer.encode(p) for p in PROMPTS[:3]]
    sampled_reference = [c.token_ids for c in Engine(ferry_smollm.model, ferry_smollm.tokenizer).generate(ids, sampled)]
    with LLM(str(smollm_path), device="cpu", pp=2, micro_batches=3) as llm:
        assert (llm.parallel_info["tp"], llm.parallel_info["pp"]) == (1, 2)
        first = llm.generate(list(PROMPTS), GREEDY)
        streamed = [e.token_id for e in llm.stream([PROMPTS[0]], GREEDY)]
        seeded = llm.generate(list(PROMPTS[:3]), sampled)
    assert [c.token_ids for c in first] == reference_tokens
    assert streamed == reference_tokens[0]
    assert [c.token_ids for c in seeded] == sampled_reference
