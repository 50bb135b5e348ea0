"""Pipeline parallelism on GPUs (a 2-GPU device machine; skipped elsewhere): stages replaying their CUDA graphs over
NCCL give one GPU's tokens, and two single-GPU torchrun "nodes" talking over sockets give them too.

Exact equality holds because a pipeline changes no arithmetic: every layer runs the same kernels on the same
shapes as on one GPU, and the hidden state crosses the link in its own dtype. Each micro-batch holds one
prompt, and the reference runs each prompt alone, so the batch shapes (and the kernels chosen for them) agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ferry.engine.sampling import SamplingParams
from ferry.parallel.launch import free_port, spawn

pytestmark = pytest.mark.gpu
PROMPTS = ([11, 22, 33, 44, 55, 66, 77], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21])
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def _needs(gpus: int) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")


def _pipeline_tokens(world) -> dict:
    from ferry.bench.shapes import TINY, random_model
    from ferry.parallel.layout import stage_spans
    from ferry.parallel.mesh import Mesh, StagePeers, split_groups
    from ferry.parallel.pipeline_engine import PipelineEngine
    from ferry.parallel.pipeline_stage import PipelineLinks, PipelineStage

    mesh = Mesh(1, 2)
    device = torch.device(f"cuda:{world.rank}")
    tp_group = split_groups(mesh, world.rank, None)
    links = PipelineLinks(StagePeers(mesh, world.rank), timeout_s=120)
    model = random_model(TINY, device, torch.bfloat16, group=tp_group,
                         span=stage_spans(TINY.num_layers, 2)[links.peers.stage])
    stage = PipelineStage(model, links)
    engine = PipelineEngine(model, None, stage, micro_batches=2, kv_memory="1GiB")
    completions = engine.generate([list(p) for p in PROMPTS], GREEDY)
    engine.close()
    return {"tokens": [c.token_ids for c in completions],
            "graph_steps": sum(e.stats.graph_steps for e in engine.engines), "path": engine.decode_path}


def test_pp2_graph_decode_gives_one_gpu_tokens():
    _needs(2)
    from ferry.bench.shapes import TINY, random_model
    from ferry.engine.engine import Engine

    engine = Engine(random_model(TINY, torch.device("cuda:0"), torch.bfloat16), None, kv_memory="1GiB")
    reference = [engine.generate([list(p)], GREEDY)[0].token_ids for p in PROMPTS]
    del engine
    torch.cuda.empty_cache()
    result = spawn(2, "cuda", _pipeline_tokens, (), timeout_s=300)
    assert result["tokens"] == reference
    assert result["graph_steps"] > 0, result["path"]  # decode replayed the stage's graphs


def _installed_model() -> str:
    try:
        from ferry.model.default_model import default_model_path

        return str(default_model_path())
    except Exception:  # noqa: BLE001 -- any failure means the wheel is not there
        pytest.skip("the default model's package is not installed")


def test_two_torchrun_gpu_nodes_over_sockets_give_one_gpu_tokens():
    _needs(2)
    model = _installed_model()
    prompt = "Explain what a pipeline stage is in one sentence."
    args = ["generate", "--model", model, "--device", "cuda", "--json", "--max-tokens", "32", "--ignore-eos", prompt]
    one = subprocess.run([sys.executable, "-m", "ferry.cli", *args], check=False, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # Two "nodes" of one GPU each, NCCL kept off NVLink and shared memory: the hidden states go over sockets.
    env = dict(os.environ, NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "gpu-nodes",
                               "-m", "ferry.cli", *args, "--timeout", "120"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    doc = next(json.loads(out) for out, _ in outs if out.strip())
    assert (doc["tp"], doc["pp"]) == (1, 2)
    assert doc["completions"][0]["token_ids"] == json.loads(one.stdout)["completions"][0]["token_ids"]


def test_a_pp2_gpu_server_answers_concurrent_requests_and_frees_an_aborted_one():
    """`ferry serve --pp 2` on two GPUs (random Llama-shaped weights): requests joining between ticks, a client
    that leaves mid-stream, stage graphs replayed, and the stages still in step afterwards."""
    _needs(2)
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    from serve_process import ServeProcess

    server = ServeProcess("--pp", "2", "--shape", "tiny", "--device", "cuda", "--kv-memory", "1GiB",
                          "--served-model-name", "tiny")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(i: int) -> int:
            return client.completions.create(model="tiny", prompt=[7 + i, 8, 9, 10 + i], max_tokens=16 + i,
                                             temperature=0, extra_body={"ignore_eos": True}).usage.completion_tokens

        with ThreadPoolExecutor(8) as pool:
            counts = list(pool.map(ask, range(8)))
            with client.completions.with_streaming_response.create(model="tiny", prompt=[1, 2, 3], max_tokens=500,
                                                                    stream=True) as resp:
                next(resp.iter_lines())  # one event in, then the client leaves
        assert counts == [16 + i for i in range(8)]
        server.wait_for(lambda: server.metric("ferry_kv_blocks_used") == 0, what="the aborted request's blocks")
        assert ask(3) == 19  # still in step
        assert server.metric("ferry_engine_graph_steps_total") > 0
        assert server.metric('ferry_link_bytes_total{link="pipeline_hidden"}') > 0
    finally:
        assert server.stop() == 0
