"""The packed-weight cache (ferry/model/weights/packed_cache.py): a CPU-quantized load of a GGUF writes it, the next
load of the same file reads it and is the same model (bit-equal logits, formats, tokenizer, config), and a changed
file, another dtype or a load that does not quantize never meets it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from test_quantized_weights import default_formats

from ferry.model.default_model import default_model_path
from ferry.model.loader import load_model
from ferry.model.weights import packed_cache

CPU = torch.device("cpu")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "packed"


def _logits(loaded, ids: list[int]) -> torch.Tensor:
    from ferry.bench.tp_quality import teacher_forced_logits

    return teacher_forced_logits(loaded.model, [ids])


def test_a_second_load_comes_from_the_cache_and_is_the_same_model(cache):
    first = load_model(None, CPU, torch.bfloat16, show_progress=False)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "tensors.safetensors").is_file()
    second = load_model(None, CPU, torch.bfloat16, show_progress=False)
    assert second.load_seconds < first.load_seconds
    assert second.model.weight_formats() == first.model.weight_formats() == default_formats()
    assert second.config == first.config
    text = "The capital of France is"
    assert second.tokenizer.encode_chat(text) == first.tokenizer.encode_chat(text)
    ids = first.tokenizer.encode("Caches keep what a conversion built, so the next start skips it.")
    assert torch.equal(_logits(second, ids), _logits(first, ids))


def test_a_changed_file_or_another_dtype_is_another_entry_and_native_loads_write_none(cache, tmp_path):
    gguf = tmp_path / "model.gguf"
    shutil.copyfile(default_model_path(), gguf)
    load_model(gguf, CPU, torch.bfloat16, show_progress=False)
    assert len(list(cache.iterdir())) == 1
    os.utime(gguf, ns=(0, 10**18))  # the same bytes, another modification time: not trusted to be the same file
    assert not (packed_cache.entry_folder(gguf, torch.bfloat16) / "meta.json").exists()
    load_model(gguf, CPU, torch.bfloat16, show_progress=False)
    assert len(list(cache.iterdir())) == 2
    load_model(gguf, CPU, torch.float32, show_progress=False)  # fp32: native weights, nothing to keep
    load_model(gguf, CPU, torch.bfloat16, show_progress=False, weights="native")
    assert len(list(cache.iterdir())) == 2


def test_blocks_packed_for_qmatmul_and_for_torch_int4_are_entries_of_their_own(cache, monkeypatch):
    """Ferry's qmatmul (the default where it is built) and torch's int4 kernel (FERRY_QMATMUL=0) pack the same blocks
    differently: each has an entry of its own, read back as such; fp32 activations over qmatmul's blocks (the CPU
    default) are a third."""
    from ferry.model.layers.quant import qmatmul_unavailable

    if qmatmul_unavailable() is not None:
        pytest.skip(f"qmatmul not built here: {qmatmul_unavailable()}")
    for _ in range(2):
        assert "4-bit qmatmul" in load_model(None, CPU, torch.bfloat16, show_progress=False).model.weight_formats()
    monkeypatch.setenv("FERRY_QMATMUL", "0")
    for _ in range(2):
        int4 = load_model(None, CPU, torch.bfloat16, show_progress=False)
        assert int4.model.weight_formats() == "120 int4, 1 q8_0 as int4 pairs"
    assert len(list(cache.iterdir())) == 2
    monkeypatch.delenv("FERRY_QMATMUL")
    for _ in range(2):
        fp32 = load_model(None, CPU, torch.float32, show_progress=False, weights="quantized")
        assert fp32.model.weight_formats() == default_formats() and fp32.model.norm.weight.dtype == torch.float32
    assert len(list(cache.iterdir())) == 3
    # fp32 left to "auto" is exact: it must not meet the entry the fp32 "quantized" loads left under the same dtype
    assert load_model(None, CPU, torch.float32, show_progress=False).model.weight_formats() == "121 torch.float32"
