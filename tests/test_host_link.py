"""Host <-> device link pieces that have a CPU meaning: the pinned pool's reuse, bounds, thread safety and
in-flight guard, and async token readback giving exactly the synchronous mode's outputs."""

from __future__ import annotations

import threading

import pytest

from ferry.comm.pinned_pool import PinnedBufferPool, size_class
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams


class SlowCopy:
    """A fence for a copy that has not finished until the test says so."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def query(self) -> bool:
        return self.done.is_set()


def test_released_buffers_are_reused_by_size_class():
    pool = PinnedBufferPool(max_bytes=1 << 20, pin=False)
    a = pool.acquire(5000)
    assert a.size_class == size_class(5000) == 8192 and a.tensor.numel() == 8192
    pool.release(a)
    b = pool.acquire(7000)
    assert b is a and pool.stats.hits == 1 and pool.stats.misses == 1
    c = pool.acquire(100)  # another class: a new buffer
    assert c is not a and c.size_class == 4096 and pool.stats.bytes_pinned == 8192 + 4096


def test_buffer_is_not_handed_out_while_its_copy_is_in_flight():
    pool = PinnedBufferPool(max_bytes=1 << 20, pin=False)
    buf = pool.acquire(4096)
    slow = SlowCopy()
    pool.release(buf, fence=slow)
    other = pool.acquire(4096)
    assert other is not buf and pool.stats.waits_on_fence == 1
    slow.done.set()  # the copy finished
    assert pool.acquire(4096) is buf


def test_pool_is_bounded_and_evicts_only_idle_buffers():
    pool = PinnedBufferPool(max_bytes=3 * 4096, pin=False)
    held = [pool.acquire(4096) for _ in range(3)]
    with pytest.raises(MemoryError, match="pinned pool is full"):
        pool.acquire(4096)
    slow = SlowCopy()
    pool.release(held[0], fence=slow)
    with pytest.raises(MemoryError):
        pool.acquire(8192)  # the only free buffer is still in flight: nothing may be evicted
    pool.release(held[1])
    pool.release(held[2])
    big = pool.acquire(8192)  # the two idle 4 KiB buffers are evicted to make room; the in-flight one stays
    assert big.size_class == 8192 and pool.stats.bytes_pinned <= pool.max_bytes


def test_pool_is_thread_safe():
    pool = PinnedBufferPool(max_bytes=64 << 20, pin=False)
    in_use: set[int] = set()
    lock, errors = threading.Lock(), []

    def worker() -> None:
        for _ in range(300):
            buf = pool.acquire(4096)
            with lock:
                if id(buf) in in_use:
                    errors.append("handed out twice")
                in_use.add(id(buf))
            buf.tensor[0] = 1
            with lock:
                in_use.discard(id(buf))
            pool.release(buf)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.stats.hits + pool.stats.misses == 8 * 300 and pool.stats.misses <= 8


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True),
     SamplingParams(max_tokens=40, stop=("\n\n",))],
)
@pytest.mark.slow
def test_async_readback_gives_exactly_the_synchronous_outputs(ferry_smollm, params):
    tok = ferry_smollm.tokenizer
    prompts = [tok.encode_chat("Name two planets."), tok.encode("Once upon a time"), tok.encode("1, 2, 3,")]
    outputs = []
    for sync in (True, False):
        engine = Engine(ferry_smollm.model, tok, sync_output=sync)
        outputs.append([(c.token_ids, c.text, c.finish_reason) for c in engine.generate(prompts, params)])
    assert outputs[0] == outputs[1]


def test_packed_upload_round_trips_every_field_with_one_copy():
    import torch

    from ferry.comm.copy_stream import CopyStream
    from ferry.comm.step_packer import StepPacker, layout

    fields = {
        "ids": torch.randint(0, 50000, (3, 7)),
        "positions": torch.arange(21, dtype=torch.int32).view(3, 7),
        "lengths": torch.tensor([7, 5, 2], dtype=torch.int16),
        "temperature": torch.tensor([0.0, 0.7, 1.3]),
        "flags": torch.tensor([True, False, True]),
    }
    offsets, total = layout(fields)
    assert all(at % fields[name].element_size() == 0 for name, (at, _) in offsets.items())
    assert total == sum(n for _, n in offsets.values())
    packer = StepPacker(torch.device("cpu"), PinnedBufferPool(pin=False), CopyStream(torch.device("cpu")))
    first = packer.upload(fields)
    second = packer.upload({k: v.clone() * 0 if v.dtype != torch.bool else ~v for k, v in fields.items()})
    assert packer.uploads == 2
    assert set(first.keys()) == set(fields)
    for name, t in fields.items():  # the first step's views survive the second upload (two staging slots)
        assert first[name].dtype == t.dtype and first[name].shape == t.shape
        assert torch.equal(first[name], t), name
    assert torch.equal(second["flags"], ~fields["flags"])


def test_packed_layout_fields_written_in_place_go_up_in_one_copy_per_step():
    import torch

    from ferry.comm.copy_stream import CopyStream
    from ferry.comm.step_packer import PackedLayout

    cpu = torch.device("cpu")
    packed = PackedLayout(cpu, CopyStream(cpu), {"ids": (torch.long, 12), "scale": (torch.float16, 3),
                                                 "flags": (torch.bool, 5), "lengths": (torch.int32, 3)})
    assert all(at % packed.fields[name][0].itemsize == 0 for name, (at, _) in packed.offsets.items())
    steps = []
    for step in range(3):
        host = packed.next_host()
        host["ids"][:6].copy_(torch.arange(6) + 100 * step)
        host["scale"][:] = torch.tensor([0.5, 1.5, step], dtype=torch.float16)
        host["flags"][:2] = torch.tensor([True, step % 2 == 1])
        host["lengths"][:] = torch.tensor([step, 2, 3], dtype=torch.int32)
        dev = packed.upload()
        steps.append({k: v.clone() for k, v in dev.items()} | {"live": dev})
    assert packed.uploads == 3
    assert torch.equal(steps[2]["ids"][:6], torch.arange(6) + 200)
    assert steps[2]["scale"].tolist() == [0.5, 1.5, 2.0] and steps[2]["lengths"].tolist() == [2, 2, 3]
    assert steps[1]["flags"][:2].tolist() == [True, True]
    # Device slots alternate: step 1's views still hold step 1 after step 2 uploaded into the other slot.
    assert torch.equal(steps[1]["live"]["ids"][:6], torch.arange(6) + 100)
    assert packed.fits(ids=12)
    assert not packed.fits(ids=13)


def test_every_engine_step_uploads_its_inputs_in_one_copy():
    """Decodes, prefill chunks of a long prompt, block tables and in-flight token routing: one copy per step."""
    import torch

    from ferry.bench.shapes import TINY, random_model
    from ferry.engine.engine import Engine
    from ferry.engine.sampling import SamplingParams

    tiny = Engine(random_model(TINY, torch.device("cpu"), torch.float32), None, max_batched_tokens=256)
    tiny.generate([[5] * 700, [6] * 30, [7] * 3], SamplingParams(max_tokens=4, ignore_eos=True))
    assert tiny.stats.prefill_tokens == 733 and tiny.stats.steps >= 3  # the long prompt took three chunks
    assert tiny.inputs.uploads == tiny.stats.steps


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_streamed_weights_give_identical_output_and_prefetch_one_layer_ahead(ferry_smollm, fraction):
    import torch

    from ferry.model.loader import load_model

    streamed = load_model(None, torch.device("cpu"), torch.float32, show_progress=False, offload_fraction=fraction)
    streamer = streamed.model.weight_streamer
    n = round(fraction * streamed.config.num_layers)
    assert streamer.streamed == list(range(streamed.config.num_layers - n, streamed.config.num_layers))
    tok = ferry_smollm.tokenizer
    prompts = [tok.encode_chat("Name a red fruit."), tok.encode("The ocean is")]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = [c.token_ids for c in Engine(ferry_smollm.model, tok).generate(prompts, params)]
    assert [c.token_ids for c in Engine(streamed.model, tok).generate(prompts, params)] == ref
    # Double buffering: the copy of each streamed layer is queued before the previous layer runs.
    trace = streamer.trace
    for prev, nxt in zip(streamer.streamed, streamer.streamed[1:]):
        assert trace.index(("copy", nxt)) < trace.index(("run", prev))
    assert sum(1 for kind, _ in trace if kind == "copy") == n  # one copy per streamed layer per forward


def test_offload_fraction_outside_zero_one_is_refused():
    import torch

    from ferry.errors import FerryError
    from ferry.model.loader import load_model

    with pytest.raises(FerryError, match="fraction"):
        load_model(None, torch.device("cpu"), torch.float32, show_progress=False, offload_fraction=1.5)


@pytest.mark.slow
def test_bench_host_on_cpu_says_what_it_cannot_measure_and_runs_the_rest(tmp_path):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ferry.cli", "bench", "host", "--device", "cpu", "--max-size-mb", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stderr
    [result] = tmp_path.glob("*_host_link_cpu.json")
    doc = json.loads(result.read_text())
    assert doc["link"].startswith("host memory only")
    assert {r["test"] for r in doc["results"]} == {"bandwidth", "per-step upload"}
    # Nothing is pinned without CUDA: no row may say it is.
    assert not [r["mode"] for r in doc["results"] if "pinned" in r["mode"] and "pageable" not in r["mode"]]


def test_streamed_layers_are_built_in_host_memory_never_on_the_device():
    import torch

    from ferry.bench.shapes import TINY
    from ferry.comm.group import ParallelGroup
    from ferry.model.loader import build_model, stream_layers, streamed_layers

    streamed = streamed_layers(TINY.num_layers, 0.5)
    assert streamed == [2, 3]
    # "meta" stands in for a device too small for the model: only the resident parts are allocated there.
    model = build_model(TINY, torch.device("meta"), torch.float32, ParallelGroup.single(), frozenset(streamed))
    for i, layer in enumerate(model.layers):
        assert {p.device.type for p in layer.parameters()} == ({"cpu"} if i in streamed else {"meta"})
    assert model.lm_head.weight.device.type == "meta"
    streamer = stream_layers(model, streamed)  # not activated: loading would write into the host buffers
    flat = streamer._host[2]
    param = model.layers[2].self_attn.qkv_proj.weight
    assert flat.data_ptr() <= param.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
    # The norms are not in the streamed buffer: the layer before reads a layer's input norm (see weight_stream.py).
    norm = model.layers[2].input_layernorm.weight
    assert not flat.data_ptr() <= norm.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
