"""The compiled CPU decode step (ferry/engine/cpu_compiled.py): the same tokens as the eager engine, for one
sequence and for batches whose members join at different steps; the K/V pools are separate tensors (so the
compiled step writes them in place); and where it cannot run, asking for it is an error naming why while the
default says which path runs instead."""

from __future__ import annotations

import pytest
import torch

from ferry.bench.shapes import TINY, random_model
from ferry.engine.cpu_compiled import PATH, compiler_missing, ineligible
from ferry.engine.engine import Engine
from ferry.engine.paged_cache import PagedKVCache
from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError
from ferry.model.layers.paged_attention import decode_attention_path

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    """fp32, with the LM head scaled up so greedy choices are far from ties (the compiled step sums in another
    order than eager ops do)."""
    model = random_model(TINY, CPU, torch.float32, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=gen).tolist() for n in (7, 40, 23)]


def _tokens(engine: Engine, prompts, max_tokens: int = 24) -> list[list[int]]:
    # Requests join at different steps: each is added after the previous one has decoded a few tokens.
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = []
    out: dict[int, list[int]] = {}

    def step() -> None:
        for ev in engine.step():
            out.setdefault(ev.index, []).append(ev.token_id)

    for p in prompts:
        ids.append(engine.add_request(p, params))
        for _ in range(3):
            step()
    while engine.has_unfinished():
        step()
    engine.check_no_leaks()
    return [out[i] for i in ids]


def test_compiled_cpu_decode_gives_the_eager_engines_tokens_alone_and_in_batches_joining_late(tiny, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setenv("FERRY_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    prompts = _prompts()
    eager = Engine(tiny, None, compile=False)
    assert eager.decode_path.startswith("eager") and eager.compiled_decode is None
    alone = [_tokens(eager, [p])[0] for p in prompts]
    together = _tokens(eager, prompts)
    assert together == alone

    torch._dynamo.reset()
    compiled = Engine(tiny, None, compile=True)
    assert compiled.decode_path.startswith(PATH)
    assert f"attention {decode_attention_path('cpu', compiled=True)}" in compiled.decode_path
    compiled.warm_up()
    assert compiled.compiled_decode.compiled_rows == {1}
    assert _tokens(compiled, prompts[:1]) == alone[:1]
    assert _tokens(compiled, prompts) == alone
    assert compiled.compiled_decode.compiled_rows == {1, 2}  # the batch-dynamic graph, compiled on first use
    assert compiled.stats.compiled_steps > 0
    assert (tmp_path / "inductor").is_dir()  # the compile cache lives in Ferry's cache folder
    # The step runs without guards on the model's modules: another engine's step (another model, maybe another
    # dtype) must never reach these graphs, so each engine compiles a code object of its own.
    other = Engine(random_model(TINY, CPU, torch.bfloat16, seed=4), None, compile=True)
    assert other.compiled_decode.code is not compiled.compiled_decode.code


def test_every_k_and_v_pool_is_its_own_tensor_and_block_copies_still_cover_every_layer():
    cache = PagedKVCache(3, 8, 16, 2, 4, torch.float32, CPU)
    pointers = {pool.untyped_storage().data_ptr() for pool in cache.pools}
    assert len(pointers) == len(cache.pools) == 6
    for i, pool in enumerate(cache.pools):
        pool.copy_(torch.arange(pool.numel(), dtype=torch.float32).view_as(pool) + 1000 * i)
    blocks = torch.tensor([5, 2])
    packed = cache.block_view(blocks)
    assert packed.shape == (3, 2, 2, 16, 2, 4)
    assert torch.equal(packed[1, 1], cache.layers[1][1][blocks])
    cache.copy_block(5, 6)
    assert all(torch.equal(pool[6], pool[5]) for pool in cache.pools)
    cache.write_blocks(torch.tensor([0, 1]), packed)
    assert all(torch.equal(pool[0], pool[5]) and torch.equal(pool[1], pool[2]) for pool in cache.pools)
    assert cache.nbytes == 6 * 8 * 16 * 2 * 4 * 4


def test_without_a_compiler_asking_is_an_error_and_the_default_names_the_eager_path(tiny, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert compiler_missing() == "no C++ compiler (no-such-compiler-here) on PATH"
    with pytest.raises(FerryError, match=r"--compile on cpu: .*no C\+\+ compiler"):
        Engine(tiny, None, compile=True)
    monkeypatch.setenv("FERRY_COMPILE", "1")  # the default of a long-lived engine outside the tests
    engine = Engine(tiny, None, compile=None)
    assert engine.compiled_decode is None
    assert engine.decode_path.startswith("eager (no C++ compiler (no-such-compiler-here) on PATH)")


def test_tensor_parallel_ranks_pipeline_stages_and_streamed_layers_are_named_as_not_compilable(tiny):
    class Group:
        world_size = 2

    class Sharded:
        group = Group()

    assert "tensor-parallel" in ineligible(Sharded(), None, False)
    assert "pipeline stage" in ineligible(tiny, object(), False)
    assert "--offload-weights" in ineligible(tiny, None, True)
    assert ineligible(tiny, None, False) == compiler_missing()



def test_the_quality_pass_through_the_decode_step_gives_the_prefills_logits_and_frees_its_blocks(tiny):
    """benchmarks/cpu_decode.py's quality column: a text fed one token per decode step through the engine gives, in
    fp32, the logits a prefill over the whole text gives."""
    from ferry.bench.decode_quality import decode_forced_logits
    from ferry.bench.tp_quality import teacher_forced_logits

    ids = _prompts()[1]  # 40 tokens: three blocks
    engine = Engine(tiny, None, compile=False)
    stepped = decode_forced_logits(engine, ids)
    assert stepped.shape == (1, len(ids), TINY.vocab_size)
    torch.testing.assert_close(stepped, teacher_forced_logits(tiny, [ids]), rtol=1e-4, atol=1e-3)
    engine.check_no_leaks()


def test_a_compile_mode_is_taken_as_its_options(tiny):
    """torch.compile takes a mode or options, never both: the mode's options join Ferry's (none compiled here)."""
    engine = Engine(tiny, None, compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert engine.compiled_decode is not None and engine.decode_path.startswith(PATH)
