"""`ferry serve` and the batched cloud on a GPU (skipped without CUDA; the default model must be installed).

The server's engine runs CUDA graphs in its own process: its greedy answers must equal the Python API's on the same
device. The cloud batches sessions' frames through the paged kernel on CUDA: its tokens must equal the one-by-one
path's (dense cache) on the same device, fp32 so no bf16 near-tie can flip a token."""

from __future__ import annotations

import threading

import pytest
import torch

from ferry.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
PROMPTS = ["What is the capital of France?", "Write a short poem about rivers.", "List three prime numbers.",
           "Why is the sky blue?"]


@pytest.fixture(scope="module")
def cuda_smollm(smollm_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ferry.model.loader import load_model

    return load_model(None, CUDA, torch.float32, show_progress=False)


def test_served_greedy_answers_equal_the_python_api_on_the_gpu(smollm_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    openai = pytest.importorskip("openai")
    from serve_process import ServeProcess

    from ferry import LLM

    server = ServeProcess("--device", "cuda", "--served-model-name", "smollm", "--kv-memory", "4GiB")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        served = [client.completions.create(model="smollm", prompt=p, max_tokens=24, temperature=0).choices[0].text
                  for p in PROMPTS]
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="smollm", prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True) if c.choices)
        assert server.metric("ferry_engine_graph_steps_total") > 0  # decode ran from CUDA graphs in the server
    finally:
        assert server.stop() == 0
    llm = LLM(device="cuda", kv_memory="4GiB")
    expected = [llm.generate([p], SamplingParams(max_tokens=24))[0].text for p in PROMPTS]
    assert served == expected
    assert streamed == expected[0]


def test_a_tp2_server_on_two_gpus_answers_concurrent_requests_like_one_gpu(smollm_path):
    """NCCL for the model's collectives, the gloo control group for the step-boundary agreement; fp32 so the
    two layouts' different summation orders cannot flip a greedy token."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    from serve_process import ServeProcess

    from ferry import LLM

    server = ServeProcess("--tp", "2", "--device", "cuda", "--dtype", "fp32", "--served-model-name", "smollm",
                          "--kv-memory", "4GiB")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(prompt: str) -> str:
            return client.completions.create(model="smollm", prompt=prompt, max_tokens=24,
                                             temperature=0).choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            served = list(pool.map(ask, PROMPTS))
        sampled = client.completions.create(model="smollm", prompt=PROMPTS[0], max_tokens=16, temperature=1.0,
                                            extra_body={"ignore_eos": True})
        assert sampled.usage.completion_tokens == 16  # unseeded: one seed for both ranks, or they would part
        assert ask(PROMPTS[1]) == served[1]  # still in step
        assert server.metric('ferry_link_bytes_total{link="allreduce"}') > 0
    finally:
        assert server.stop() == 0
    llm = LLM(device="cuda", dtype="fp32", kv_memory="4GiB")
    assert served == [llm.generate([p], SamplingParams(max_tokens=24))[0].text for p in PROMPTS]


def test_batched_cloud_on_the_gpu_gives_the_one_by_one_tokens(cuda_smollm, ferry_smollm):
    from ferry.edge.cloud import CloudServer
    from ferry.edge.cloud_batcher import DEFAULT_BATCHING
    from ferry.edge.edge import EdgeClient

    params = SamplingParams(max_tokens=10, ignore_eos=True)
    ids = [ferry_smollm.tokenizer.encode_chat(p) for p in PROMPTS]

    def run(batching) -> tuple[list, object]:
        server = CloudServer(cuda_smollm, 10, "gpu-token", None, batching)
        server.start("127.0.0.1:0")
        out: list = [None] * len(ids)

        def one(i: int) -> None:
            client = EdgeClient(ferry_smollm, [f"127.0.0.1:{server.port}"], 10, "gpu-token", timeout_s=120)
            try:
                out[i] = client.generate(ids[i], params)[0].token_ids
            finally:
                client.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ids))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        stats = server.stats
        server.stop(0)
        return out, stats

    batched, stats = run(DEFAULT_BATCHING)
    one_by_one, _ = run(None)
    assert batched == one_by_one
    assert stats.steps < stats.frames  # sessions shared steps on the GPU
