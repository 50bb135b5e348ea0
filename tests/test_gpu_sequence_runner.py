"""SequenceRunner on a GPU (skipped without CUDA): the paged pool grows there (a CPU pool covers the whole context
from the start), one-token steps read it through the Triton decode kernel, multi-token steps through the prefill
path; values equal the dense path's on the same GPU, after a rewind and across growth. The compiled step is the
CPU's: asking for it on a GPU is an error naming why. With the default model, an edge whose layers run on the GPU
gives the whole model's greedy tokens."""

from __future__ import annotations

import pytest
import torch
from sequence_cases import dense_logits, random_ids

from ferry.bench.shapes import TINY, random_model
from ferry.engine.sampling import SamplingParams
from ferry.engine.sequence_runner import SequenceRunner
from ferry.errors import FerryError

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return random_model(TINY, CUDA, torch.float32, seed=11)




def test_steps_on_the_gpu_give_the_dense_logits_across_growth_and_a_rewind(tiny):
    first, other = random_ids(70, 1), random_ids(40, 2)
    runner = SequenceRunner(tiny, None, compile=None, pool_tokens=16)
    assert runner.path == "eager, attention triton-split-k"  # the tests' FERRY_COMPILE=0
    ref = dense_logits(tiny, first)
    torch.testing.assert_close(runner.run(torch.tensor(first[:21], device=CUDA), 0)[0], ref[20], rtol=1e-3, atol=1e-3)
    for pos in range(21, 70):
        out = runner.run(torch.tensor([first[pos]], device=CUDA), pos)[0]
        torch.testing.assert_close(out, ref[pos], rtol=1e-3, atol=1e-3)
    assert runner.capacity >= 70 and runner.cache.layers[0][0].is_cuda
    rewound = first[:33] + other
    ref = dense_logits(tiny, rewound)
    for pos in range(33, len(rewound)):
        out = runner.run(torch.tensor([rewound[pos]], device=CUDA), pos)[0]
        torch.testing.assert_close(out, ref[pos], rtol=1e-3, atol=1e-3)


def test_asking_for_the_compiled_step_on_a_gpu_is_an_error(tiny):
    with pytest.raises(FerryError, match="--compile on cuda: .*the CPU's"):
        SequenceRunner(tiny, 2, compile=True)


def test_an_edge_on_the_gpu_gives_the_whole_models_tokens(smollm_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ferry.edge.cloud import CloudServer
    from ferry.edge.edge import EdgeClient
    from ferry.engine.engine import Engine
    from ferry.model.loader import load_model, open_partial

    whole = load_model(None, CUDA, torch.float32, show_progress=False)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = whole.tokenizer.encode_chat("Why is the sky blue?")
    reference = Engine(whole.model, whole.tokenizer).generate([prompt], params)[0].token_ids
    server = CloudServer(whole, 6, "gpu-token", None, None)
    server.start("127.0.0.1:0")
    client = EdgeClient(open_partial(None, CUDA, torch.float32), [f"127.0.0.1:{server.port}"], 6, "gpu-token",
                        timeout_s=120)
    try:
        completion, _ = client.generate(prompt, params)
    finally:
        client.close()
        server.stop(0)
    assert client.runner.cache.layers[0][0].is_cuda
    assert completion.token_ids == reference
