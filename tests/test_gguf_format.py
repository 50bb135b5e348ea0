"""Ferry's GGUF header reader and dequantizers agree with the gguf package on every supported type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from ferry.errors import UnsupportedModelError
from ferry.model.weights.dequant import dequantize
from ferry.model.weights.gguf_file import GGUFWeights, unpermute_qk
from ferry.model.weights.gguf_header import read_gguf

QUANTIZABLE = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16]
# K-quants have no quantizer in gguf: their blocks are filled with random bytes whose fp16 scales are made finite.
RANDOM_BLOCKS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def _random_kquant(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    # Scales are fp16 at type-specific offsets; clear the exponent's top bit everywhere to rule out inf/NaN.
    halves = raw.view(np.uint16)
    halves &= np.uint16(0xBBFF)
    return raw.reshape(rows, cols // block * size)


def _write(path, tensors: dict[str, tuple[np.ndarray, T]], extra_meta: dict | None = None) -> None:
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_string("test.note", "héllo")
    writer.add_array("test.words", ["a", "bb", "ccc"])
    writer.add_array("test.numbers", [1.5, 2.5])
    for key, value in (extra_meta or {}).items():
        writer.add_uint32(key, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reader_and_dequantizers_match_gguf_package_for_every_supported_type(tmp_path):
    rng = np.random.default_rng(0)
    rows, cols = 8, 512
    tensors: dict[str, tuple[np.ndarray, T]] = {
        "f32": (rng.standard_normal((rows, cols)).astype(np.float32), T.F32),
        "f16": (rng.standard_normal((rows, cols)).astype(np.float16), T.F16),
        "norm": (rng.standard_normal(cols).astype(np.float32), T.F32),
    }
    for qtype in QUANTIZABLE:
        tensors[qtype.name] = (quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype), qtype)
    for qtype in RANDOM_BLOCKS:
        tensors[qtype.name] = (_random_kquant(qtype, rows, cols, rng), qtype)
    path = tmp_path / "types.gguf"
    _write(path, tensors)

    buf, meta, infos = read_gguf(path)
    reference = GGUFReader(path)
    for field in reference.fields.values():
        if not field.name.startswith("GGUF."):
            assert meta[field.name] == pytest.approx(field.contents()), field.name
    for tensor in reference.tensors:
        ours = dequantize(infos[tensor.name].rows_view(buf), infos[tensor.name].qtype)
        theirs = torch.from_numpy(np.array(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        assert ours.shape == theirs.shape, tensor.name
        assert torch.isfinite(ours).all(), tensor.name
        assert torch.equal(ours, theirs), tensor.name


def test_row_slices_read_only_their_rows(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    _write(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (quantize(weight, T.Q4_1), T.Q4_1)}, {"llama.attention.head_count": 4})
    source = GGUFWeights(tmp_path / "m.gguf")
    full = source.get("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(source.get("model.layers.0.mlp.up_proj.weight", dim=0, start=10, stop=30), full[10:30])
    assert torch.equal(source.get("model.layers.0.mlp.up_proj.weight", dim=1, start=64, stop=128), full[:, 64:128])


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.Q8_0, T.Q4_1, T.Q4_K])
def test_column_slices_on_block_boundaries_read_only_their_blocks(tmp_path, monkeypatch, qtype):
    """Row-parallel layers (o_proj, down_proj) take column slices: on block boundaries only those blocks of each
    row are dequantized; elsewhere the whole tensor is, and both give the same values."""
    import ferry.model.weights.gguf_file as gguf_file

    rng = np.random.default_rng(3)
    rows, cols = 16, 1024
    if qtype in RANDOM_BLOCKS:
        data = _random_kquant(qtype, rows, cols, rng)
    elif qtype in (T.F32, T.F16):
        data = rng.standard_normal((rows, cols)).astype(np.float32 if qtype == T.F32 else np.float16)
    else:
        data = quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    _write(tmp_path / "c.gguf", {"blk.0.ffn_down.weight": (data, qtype)}, {"llama.attention.head_count": 4})
    source = GGUFWeights(tmp_path / "c.gguf")
    name = "model.layers.0.mlp.down_proj.weight"
    full = source.get(name)
    seen = []
    monkeypatch.setattr(gguf_file, "dequantize", lambda raw, q: seen.append(raw.shape) or dequantize(raw, q))
    block = 1 if qtype in (T.F32, T.F16) else GGML_QUANT_SIZES[qtype][0]
    aligned = (256, 768)
    assert torch.equal(source.get(name, dim=1, start=aligned[0], stop=aligned[1]), full[:, 256:768])
    assert seen[-1][1] == (768 - 256) // block * (GGML_QUANT_SIZES[qtype][1] if block > 1 else 1)  # only those bytes
    assert torch.equal(source.get(name, dim=1, start=3, stop=700), full[:, 3:700])  # off-block: still right


def test_unsupported_tensor_type_is_refused_by_name(tmp_path):
    block, size = GGML_QUANT_SIZES[T.IQ2_XXS]
    raw = np.zeros((4, 256 // block * size), dtype=np.uint8)
    _write(tmp_path / "iq.gguf", {"blk.0.ffn_up.weight": (raw, T.IQ2_XXS)}, {"llama.attention.head_count": 4})
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        GGUFWeights(tmp_path / "iq.gguf")


def test_truncated_file_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    _write(tmp_path / "t.gguf", {"w": (rng.standard_normal((64, 64)).astype(np.float32), T.F32)})
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(UnsupportedModelError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:40])
    with pytest.raises(UnsupportedModelError, match="truncated"):
        read_gguf(tmp_path / "head.gguf")


def test_qk_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, hidden = 3, 8, 24
    hf = torch.randn(heads * head_dim, hidden)
    # llama.cpp's converter: within each head, interleave the two rotary halves.
    gguf_layout = hf.reshape(heads, 2, head_dim // 2, hidden).transpose(1, 2).reshape(hf.shape)
    assert torch.equal(unpermute_qk(gguf_layout, heads), hf)
