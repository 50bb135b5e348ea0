"""GPU checks for what broke on the H200 (skipped without CUDA): decode graphs captured again after a profiled
step and after the cache was reallocated (a second, larger batch), and the pooled pinned copies moving exactly the
bytes a raw pinned copy moves, in order and on the copy stream.

The speed side of the host link lives in `ferry bench host` (a benchmark, not a timed test)."""

from __future__ import annotations

import pytest
import torch

from ferry.engine.sampling import SamplingParams
from ferry.engine.static_engine import StaticBatchEngine as Engine  # the dense cache's graph machinery

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny_fp32():
    """Llama-3's layout at a small size with random weights: no model file needed. fp32, so the graph's bucketed
    attention span cannot flip a near-tie against eager decode."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ferry.bench.shapes import TINY, random_model

    return random_model(TINY, CUDA, torch.float32, seed=1)


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 8000, (length + 3 * i,), generator=gen).tolist() for i in range(count)]


def test_a_second_bucket_is_captured_after_a_profiled_step_and_a_cache_reallocation(tiny_fp32):
    """Batch 1, a profiled replay of its graph, then batch 16 (the cache grows, every graph is dropped, new
    buckets are captured), then batch 1 again: no capture fails and every token equals eager decode's."""
    from torch.profiler import ProfilerActivity, profile

    from ferry.bench.decode_timing import captured_step

    params = SamplingParams(max_tokens=20, ignore_eos=True)
    graphed = Engine(tiny_fp32, None, cuda_graphs=True)
    eager = Engine(tiny_fp32, None, cuda_graphs=False)
    one, sixteen = _prompts(1, 12, seed=2), _prompts(16, 12, seed=3)

    first = graphed.generate(one, params)
    step = captured_step(graphed, 1, len(one[0]) + params.max_tokens)
    assert step is not None
    with profile(activities=[ProfilerActivity.CUDA]):
        step.graph.replay()
        torch.cuda.synchronize()
    big = graphed.generate(sixteen, params)  # reallocates the cache: all graphs reset, new ones captured
    again = graphed.generate(one, params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again] == \
        [c.token_ids for c in eager.generate(one, params)]
    assert [c.token_ids for c in big] == [c.token_ids for c in eager.generate(sixteen, params)]


def test_a_graph_is_captured_at_a_new_context_bucket_mid_generation(tiny_fp32):
    """A prompt just under the first 256-token bucket decodes across it: a second graph (context capped at the
    cache length, 240 + 40) is captured mid-sequence beside the first, and the tokens stay eager decode's."""
    prompt = _prompts(1, 240, seed=4)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    graphed = Engine(tiny_fp32, None, cuda_graphs=True)
    out = graphed.generate(prompt, params)
    assert sorted(key[1] for key in graphed.graphs.graphs) == [256, 280]
    assert out[0].token_ids == Engine(tiny_fp32, None, cuda_graphs=False).generate(prompt, params)[0].token_ids


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
        fence = how(dev, buf.view(nbytes), buf.pinned, buf.event)  # the buffer's own, reused event
        pool.release(buf, fence)
        back = pool.acquire(nbytes)
        assert back is not buf or fence.query()  # never handed out while its copy may still read it
        out = back.view(nbytes)
        copy.copy(out, dev, back.pinned, back.event).synchronize()
        assert torch.equal(out, data)
        pool.release(back)


def test_warm_up_compiles_the_first_bucket_once_and_requests_reuse_it(tiny_fp32):
    """What LLM() and chat do on CUDA: the cache is sized up front and the (1, 256) step compiled before the first
    request, so a request inside the reserved length neither reallocates the cache nor compiles again."""
    engine = Engine(tiny_fp32, None, compile=True)
    assert engine.decode_path == "cuda-graph+compile(max-autotune-no-cudagraphs)"
    engine.warm_up(batch=1, reserve_tokens=1024)
    assert list(engine.graphs.graphs) == [(1, 256)] and engine.cache.max_len == 1024
    captured = engine.graphs.graphs[(1, 256)]
    out = engine.generate(_prompts(1, 30, seed=5), SamplingParams(max_tokens=16, ignore_eos=True))
    assert len(out[0].token_ids) == 16
    assert engine.graphs.graphs[(1, 256)] is captured and engine.cache.max_len == 1024


def _prefill_with_and_without_overlap(group, path_name: str) -> dict:
    from ferry.bench.shapes import TINY, random_model
    from ferry.engine.kv_cache import KVCache

    device = torch.device(f"cuda:{group.rank}")
    group = group.with_allreduce(path_name, device, torch.float32)
    model = random_model(TINY, device, torch.float32, seed=2, group=group)
    x = torch.randint(10, 8000, (4, 64), generator=torch.Generator().manual_seed(6)).to(device)
    positions = torch.arange(64, device=device).expand(4, 64)
    out: dict = {"layers": len(model.layers)}
    for overlap in (False, True):
        model.overlap_micro_batches = overlap
        before = group.allreduce.calls[path_name]
        cache = KVCache.for_model(model)
        cache.ensure(4, 64)
        with torch.inference_mode():
            out[overlap] = model.logits(model.hidden_states(x, positions, cache.layers, 64)).cpu()
        out[f"calls_{overlap}"] = group.allreduce.calls[path_name] - before
    return out


@pytest.mark.parametrize("path_name", ["symm_one_shot", "symm_two_shot", "ferry_one_shot"])
def test_overlapped_prefill_runs_its_sums_on_the_forced_symmetric_memory_path(path_name):
    """The asynchronous sums of the overlap schedule go through the all-reduce engine: on a symmetric-memory path
    they run on its side stream under the other micro-batch's matmuls, and give the same logits as without."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from ferry.parallel.launch import spawn

    out = spawn(2, "cuda", _prefill_with_and_without_overlap, (path_name,))
    assert out["calls_True"] - out["calls_False"] == 2 * out["layers"]
    assert float((out[True] - out[False]).abs().max()) < 1e-4
