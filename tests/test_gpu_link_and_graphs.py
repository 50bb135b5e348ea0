"""GPU checks for what broke on the H200 (skipped without CUDA): decode graphs captured again after a profiled
step and after the cache was reallocated (a second, larger batch), and the pooled pinned copies moving exactly the
bytes a raw pinned copy moves, in order and on the copy stream.

The speed side of the host link lives in `ferry bench host` (a benchmark, not a timed test)."""

from __future__ import annotations

import pytest
import torch

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def smollm_fp32(smollm_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ferry.model.loader import load_model

    return load_model(None, CUDA, torch.float32, show_progress=False)


def test_a_second_bucket_is_captured_after_a_profiled_step_and_a_cache_reallocation(smollm_fp32):
    """Batch 1, a profiled replay of its graph, then batch 16 (the cache grows, every graph is dropped, new
    buckets are captured), then batch 1 again: no capture fails and every token equals eager decode's (fp32, so
    the graph's bucketed attention span cannot flip a near-tie)."""
    from torch.profiler import ProfilerActivity, profile

    from ferry.bench.decode_timing import captured_step

    tok = smollm_fp32.tokenizer
    prompts = [tok.encode(p) for p in ("The capital of France is", "Water boils at", "def add(a, b):")]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    graphed = Engine(smollm_fp32.model, tok, cuda_graphs=True)
    eager = Engine(smollm_fp32.model, tok, cuda_graphs=False)

    first = graphed.generate(prompts[:1], params)
    step = captured_step(graphed, 1, len(prompts[0]) + params.max_tokens)
    assert step is not None
    with profile(activities=[ProfilerActivity.CUDA]):
        step.graph.replay()
        torch.cuda.synchronize()
    batch16 = [prompts[i % 3] for i in range(16)]
    big = graphed.generate(batch16, params)  # reallocates the cache: all graphs reset, new ones captured
    again = graphed.generate(prompts[:1], params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again] == \
        [c.token_ids for c in eager.generate(prompts[:1], params)]
    assert [c.token_ids for c in big] == [c.token_ids for c in eager.generate(batch16, params)]


def test_a_graph_is_captured_at_a_new_context_bucket_mid_generation(smollm_fp32):
    """A prompt just under the first 256-token bucket decodes across it: a second graph is captured mid-sequence
    beside the first (same pool) and the tokens stay eager decode's."""
    tok = smollm_fp32.tokenizer
    prompt = (tok.encode("Count slowly: one two three four five six seven eight nine ten. ") * 40)[:240]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    graphed = Engine(smollm_fp32.model, tok, cuda_graphs=True)
    out = graphed.generate([prompt], params)
    assert {key[1] for key in graphed.graphs.graphs} == {256, 512}
    assert out[0].token_ids == Engine(smollm_fp32.model, tok, cuda_graphs=False).generate([prompt], params)[0].token_ids


@pytest.mark.parametrize("nbytes", [4096, 64 << 10, 1 << 20, 16 << 20])
def test_pooled_copies_move_the_bytes_in_order_and_on_the_copy_stream(nbytes):
    from ferry.comm.copy_stream import CopyStream
    from ferry.comm.pinned_pool import PinnedBufferPool

    pool, copy = PinnedBufferPool(max_bytes=64 << 20), CopyStream(CUDA)
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    for how in (copy.copy_in_order, copy.copy):
        buf = pool.acquire(nbytes)
        assert buf.pinned and buf.tensor.is_pinned()
        buf.view(nbytes).copy_(data)
        dev = torch.full((nbytes,), 7, dtype=torch.uint8, device=CUDA)  # poisoned: every byte must be written
        fence = how(dev, buf.view(nbytes), buf.pinned)
        pool.release(buf, fence)
        back = pool.acquire(nbytes)
        assert back is not buf or fence.query()  # never handed out while its copy may still read it
        out = back.view(nbytes)
        copy.copy(out, dev, back.pinned).synchronize()
        assert torch.equal(out, data)
        pool.release(back)
