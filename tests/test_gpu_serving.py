"""The serving engine on a GPU (skipped without CUDA): decode-only steps replayed from per-batch CUDA graphs (the
Triton paged kernel inside) give eager's tokens while requests join, leave, share prefixes and are swapped out
over the copy stream; the compiled step too. fp32 random weights, so no bf16 near-tie can flip a token."""

from __future__ import annotations

import pytest
import torch

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ferry.bench.shapes import TINY, random_model

    return random_model(TINY, CUDA, torch.float32, seed=5)


def _prompts(count: int, seed: int, shared: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(10, 8000, (shared,), generator=gen).tolist()
    return [prefix + torch.randint(10, 8000, (7 + 11 * i,), generator=gen).tolist() for i in range(count)]


def _staggered(engine: Engine, prompts: list[list[int]], every: int = 3) -> list[list[int]]:
    """Add one prompt every `every` steps, run to the end; tokens per prompt."""
    out: dict[int, list[int]] = {}
    ids, step = [], 0
    while len(ids) < len(prompts) or engine.has_unfinished():
        if len(ids) < len(prompts) and step % every == 0:
            ids.append(engine.add_request(prompts[len(ids)], PARAMS))
        for e in engine.step():
            out.setdefault(e.index, []).append(e.token_id)
        step += 1
    engine.check_no_leaks()
    return [out[i] for i in ids]


def test_graphed_decode_with_requests_joining_matches_eager(tiny):
    prompts = _prompts(12, seed=1)
    graphed = Engine(tiny, None, cuda_graphs=True, kv_memory="1GiB")
    assert graphed.decode_path.startswith("cuda-graph, attention triton-split-k, elementwise ")
    eager = Engine(tiny, None, cuda_graphs=False, kv_memory="1GiB")
    assert _staggered(graphed, prompts) == _staggered(eager, prompts)
    assert graphed.stats.graph_steps > 0 and len(graphed.graphs.graphs) >= 3  # several batch buckets replayed


def test_swap_over_the_copy_stream_and_prefix_sharing_under_graphs_match_eager(tiny):
    prompts = _prompts(6, seed=2, shared=40)
    roomy = Engine(tiny, None, cuda_graphs=False, kv_memory="1GiB", prefix_caching=False).generate(prompts, PARAMS)
    tight = Engine(tiny, None, cuda_graphs=True, num_blocks=16, preemption="swap")
    out = tight.generate(prompts, PARAMS)
    assert [c.token_ids for c in out] == [c.token_ids for c in roomy]
    assert tight.swap.stats.swapped_out >= 1 and tight.blocks.stats.prefix_hit_tokens >= 16
    tight.check_no_leaks()


def test_compile_is_refused_with_the_measured_reason(tiny):
    from ferry.errors import FerryError

    with pytest.raises(FerryError, match="68.4 ms per decode step compiled vs 8.65 ms"):
        Engine(tiny, None, compile=True, kv_memory="1GiB")


def test_prefill_chunks_in_one_triton_launch_give_the_per_chunk_path_tokens(tiny, monkeypatch):
    """Chunked prefills of several prompts beside decodes (a small token budget cuts prompts into chunks at
    different offsets): the Triton varlen prefill gives the tokens the per-chunk gather + SDPA path gives."""
    from ferry.model.layers import attention

    prompts = _prompts(8, seed=3, shared=24)
    fast = Engine(tiny, None, cuda_graphs=True, kv_memory="1GiB", max_batched_tokens=48, max_running=8,
                  prefill_graphs=False)
    assert fast.prefill_path == "eager, attention triton-varlen"
    got = _staggered(fast, prompts, every=2)
    monkeypatch.setattr(attention, "prefill_attention_path", lambda device: "gather-sdpa per chunk")
    slow = Engine(tiny, None, cuda_graphs=True, kv_memory="1GiB", max_batched_tokens=48, max_running=8,
                  prefill_graphs=False)
    assert _staggered(slow, prompts, every=2) == got


def test_small_prefill_steps_replayed_from_graphs_give_eager_tokens(tiny):
    """Steps of up to 32 tokens that carry prefill chunks (beside decode rows, after cached prefixes) replay a
    captured graph per token bucket; the tokens are the eager engine's, with new prompts joining every other step."""
    prompts = _prompts(8, seed=4, shared=24)
    graphed = Engine(tiny, None, cuda_graphs=True, kv_memory="1GiB", max_batched_tokens=40, max_running=8)
    assert graphed.prefill_path == "cuda-graph up to 32 tokens, eager above, attention triton-varlen"
    got = _staggered(graphed, prompts, every=2)
    assert graphed.stats.prefill_graph_steps >= 3 and len(graphed.prefill_graphs.graphs) >= 1
    eager = Engine(tiny, None, cuda_graphs=True, kv_memory="1GiB", max_batched_tokens=40, max_running=8,
                   prefill_graphs=False)
    assert _staggered(eager, prompts, every=2) == got
    assert eager.stats.prefill_graph_steps == 0
