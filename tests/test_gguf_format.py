"""Ferry's GGUF header reader against the gguf package, and every supported dequantizer against an independent
reference: Ferry's own torch kernels (Q8_0, Q4_0, Q4_1) against gguf's numpy code, the types Ferry hands to gguf
(F16, BF16, Q5_0, Q5_1, Q2_K..Q6_K) against a plain reading of ggml's block layouts (tests/ggml_reference.py)."""

from __future__ import annotations

import ggml_reference
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

OWN_KERNELS = [T.Q8_0, T.Q4_0, T.Q4_1]  # dequantized by Ferry's torch code (ferry/model/weights/dequant.py)
FROM_GGUF = [T.F16, T.BF16, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]  # dequantized by gguf
RANDOM_BLOCKS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]  # no quantizer in gguf
# Byte offsets of the fp16 scales in each block (ggml-common.h); random bytes elsewhere are valid codes.
HALF_SCALES = {T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2),
               T.Q6_K: (208,)}


def _random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random block bytes, so every bit of every code field is exercised, with finite fp16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in HALF_SCALES[qtype]:
        # Clearing the exponent's top bit rules out inf/NaN and keeps |scale| < 4.
        raw[:, at + 1] &= np.uint8(0xBF)
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


def test_reader_metadata_and_ferrys_own_dequantizers_match_the_gguf_package(tmp_path):
    rng = np.random.default_rng(0)
    rows, cols = 8, 512
    tensors: dict[str, tuple[np.ndarray, T]] = {
        "f32": (rng.standard_normal((rows, cols)).astype(np.float32), T.F32),
        "norm": (rng.standard_normal(cols).astype(np.float32), T.F32),
    }
    for qtype in OWN_KERNELS:
        tensors[qtype.name] = (quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype), qtype)
    path = tmp_path / "types.gguf"
    _write(path, tensors)

    buf, meta, infos = read_gguf(path)
    reference = GGUFReader(path)
    for field in reference.fields.values():
        if not field.name.startswith("GGUF."):
            assert meta[field.name] == pytest.approx(field.contents()), field.name
    assert {t.name for t in reference.tensors} == set(tensors)
    for tensor in reference.tensors:
        ours = dequantize(infos[tensor.name].rows_view(buf), infos[tensor.name].qtype)
        theirs = torch.from_numpy(np.array(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        assert ours.shape == theirs.shape, tensor.name
        assert torch.isfinite(ours).all(), tensor.name
        assert torch.equal(ours, theirs), tensor.name


@pytest.mark.parametrize("qtype", FROM_GGUF, ids=lambda q: q.name)
def test_dequantizers_taken_from_gguf_match_an_independent_reading_of_the_ggml_layout(tmp_path, qtype):
    """Random bytes for every field (finite scales), read back through Ferry's GGUF reader and dequantize(),
    against tests/ggml_reference.py, which follows ggml's scalar dequantize_row_* loops value by value."""
    rng = np.random.default_rng(list(T).index(qtype))
    rows, cols = 4, 512
    if qtype == T.F16:
        data = rng.standard_normal((rows, cols)).astype(np.float16)
    elif qtype == T.BF16:
        data = rng.integers(0, 1 << 16, size=(rows, cols), dtype=np.uint16)
        data[(data & 0x7F80) == 0x7F80] &= np.uint16(0xBFFF)  # no inf/NaN: they compare unequal to themselves
        data = data.view(np.uint8)
    else:
        data = _random_blocks(qtype, rows, cols, rng)
    _write(tmp_path / "t.gguf", {"w": (data, qtype)})
    buf, _, infos = read_gguf(tmp_path / "t.gguf")
    ours = dequantize(infos["w"].rows_view(buf), infos["w"].qtype)
    expected = torch.from_numpy(ggml_reference.dequantize(np.ascontiguousarray(infos["w"].rows_view(buf)), qtype.name))
    assert ours.shape == expected.shape == (rows, cols)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q5_0, T.Q5_1], ids=lambda q: q.name)
def test_values_on_the_quantization_grid_come_back_exactly(tmp_path, qtype):
    """Values each type represents exactly survive quantize -> GGUF file -> Ferry unchanged; a misread bit or scale
    would change them. Every block holds all 32 five-bit codes, so Q5_0's scale is exactly (-4) / -16 = 0.25 and
    Q5_1's is (12.5 - (-3)) / 31 = 0.5 with minimum -3."""
    codes = np.stack([np.random.default_rng(r).permutation(32) for r in range(64)]).astype(np.float32)
    values = {T.F16: (codes - 16) / 8, T.BF16: (codes - 16) * 1024, T.Q5_0: (codes - 16) / 4,
              T.Q5_1: codes / 2 - 3}[qtype]
    values = values.reshape(4, 512)
    data = values.astype(np.float16) if qtype == T.F16 else quantize(values, qtype)
    _write(tmp_path / "g.gguf", {"w": (data, qtype)})
    buf, _, infos = read_gguf(tmp_path / "g.gguf")
    assert torch.equal(dequantize(infos["w"].rows_view(buf), infos["w"].qtype), torch.from_numpy(values))


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
        data = _random_blocks(qtype, rows, cols, rng)
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
