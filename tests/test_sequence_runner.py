"""SequenceRunner (ferry/engine/sequence_runner.py): one sequence over a paged pool of its own, for the edge of a
split (first layers, hidden states) and the speculative draft (whole model, logits). Its steps give the dense
path's values at every position, after rewinding (rejected drafts) and after its pool grows; compiled on a CPU,
its one-token steps give the eager runner's values."""

from __future__ import annotations

import pytest
import torch
from sequence_cases import dense_logits, random_ids

from ferry.bench.shapes import TINY, random_model
from ferry.engine.cpu_compiled import PATH
from ferry.engine.kv_cache import KVCache
from ferry.engine.sequence_runner import SequenceRunner
from ferry.errors import FerryError
from ferry.model.layers.paged_attention import decode_attention_path

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, CPU, torch.float32, seed=11)




def _dense_hidden(model, ids: list[int], layers: int) -> torch.Tensor:
    cache = KVCache.for_model(model, layers)
    cache.ensure(1, len(ids))
    x = torch.tensor([ids])
    with torch.inference_mode():
        return model.run_layers(model.embed_tokens(x), torch.arange(len(ids))[None], cache.layers, len(ids),
                                range(layers))[0]


def test_whole_model_steps_give_the_dense_logits_after_a_rewind_and_as_the_pool_grows(tiny):
    first, other = random_ids(40, 1), random_ids(30, 2)
    runner = SequenceRunner(tiny, None, compile=False, pool_tokens=16)  # grows twice on the way to 54 positions
    assert runner.path == f"eager, attention {decode_attention_path('cpu')}" and runner.capacity == 16
    ref = dense_logits(tiny, first)
    torch.testing.assert_close(runner.run(torch.tensor(first[:21]), 0)[0], ref[20], rtol=1e-4, atol=1e-4)
    for pos in range(21, 40):
        torch.testing.assert_close(runner.run(torch.tensor([first[pos]]), pos)[0], ref[pos], rtol=1e-4, atol=1e-4)
    assert runner.capacity >= 40
    # rewind to position 24 (drafts 24.. rejected) and go on with other tokens: nothing of the old tail is seen
    rewound = first[:24] + other
    ref = dense_logits(tiny, rewound)
    torch.testing.assert_close(runner.run(torch.tensor(other[:5]), 24)[0], ref[28], rtol=1e-4, atol=1e-4)
    for pos in range(29, len(rewound)):
        torch.testing.assert_close(runner.run(torch.tensor([rewound[pos]]), pos)[0], ref[pos], rtol=1e-4, atol=1e-4)
    assert runner.steps == 2 + (40 - 21) + (len(rewound) - 29) and runner.compiled_steps == 0


def test_first_layers_give_the_dense_hidden_states(tiny):
    ids = random_ids(33, 3)
    runner = SequenceRunner(tiny, 2, compile=False)
    ref = _dense_hidden(tiny, ids, 2)
    with torch.inference_mode():
        embedded = tiny.embed_tokens(torch.tensor(ids))
    torch.testing.assert_close(runner.run(embedded[:30], 0), ref[:30], rtol=1e-4, atol=1e-4)
    for pos in range(30, 33):
        torch.testing.assert_close(runner.run(embedded[pos : pos + 1], pos), ref[pos : pos + 1], rtol=1e-4, atol=1e-4)


def test_a_position_past_the_context_is_an_error(tiny):
    runner = SequenceRunner(tiny, None, compile=False)
    with pytest.raises(FerryError, match="past the model's context"):
        runner.run(torch.tensor([1]), TINY.max_context)


def test_asking_for_the_compiled_step_without_a_compiler_is_an_error(tiny, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(FerryError, match=r"--compile on cpu: .*no C\+\+ compiler"):
        SequenceRunner(tiny, None, compile=True)
    monkeypatch.setenv("FERRY_COMPILE", "1")
    assert SequenceRunner(tiny, 2, compile=None).path.startswith("eager (no C++ compiler")


def test_compiled_one_token_steps_give_the_eager_runners_values(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    ids = random_ids(45, 4)
    with torch.inference_mode():
        embedded = tiny.embed_tokens(torch.tensor(ids))
    for layers, inputs in ((None, torch.tensor(ids)), (2, embedded)):
        eager = SequenceRunner(tiny, layers, compile=False)
        compiled = SequenceRunner(tiny, layers, compile=True)
        assert compiled.path == f"{PATH}, attention {decode_attention_path('cpu', compiled=True)}"
        compiled.warm_up()
        for runner in (eager, compiled):
            runner.run(inputs[:20], 0)
        for pos in list(range(20, 40)) + list(range(30, 45)):  # and a rewind to 30
            want = eager.run(inputs[pos : pos + 1], pos)
            torch.testing.assert_close(compiled.run(inputs[pos : pos + 1], pos), want, rtol=1e-4, atol=1e-4)
        assert compiled.compiled_steps == 35 and eager.compiled_steps == 0
        assert set(compiled.compiled.compile_seconds) == {1}  # one graph for every context length
