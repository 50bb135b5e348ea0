"""Ferry's CPU qmatmul (int8 activations x GGUF 4/8-bit blocks, layers/cpu_qmatmul.cpp): the repacked layout holds
the checkpoint's values, the kernel equals a float reference within the rounding of its int8 activations, its
vector and scalar paths agree, and torch.compile takes it as one op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from ferry.model.layers import cpu_qmatmul
from ferry.model.weights.dequant import dequantize
from ferry.model.weights.repack import QuantBlocks
from ferry.model.weights.repack_qmatmul import can_pack_qmatmul, pack_qmatmul, pack_unsigned

if cpu_qmatmul.load() is not None:
    pytest.skip(f"qmatmul is not built here: {cpu_qmatmul.load()}", allow_module_level=True)

QTYPES = {"Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q8_0": Q.Q8_0}
# (rows, cols): SmolLM2's q/k/v, o, gate/up and down shapes, and sizes that fill no tile of 16 rows.
SHAPES = [(960, 576), (576, 1536), (37, 64), (5, 32)]


def _blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> QuantBlocks:
    w = rng.standard_normal((rows, cols)) * rng.uniform(0.05, 2.0, (rows, 1)) + rng.uniform(-0.5, 0.5, (rows, 1))
    return QuantBlocks(qtype, quantize(w.astype(np.float32), qtype), cols)


def _rounding_bound(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The most int8 activation rounding can move each output: every x_i moves by at most half its group's step
    max|x| / 127, so |y - y_ref| <= sum over groups of (max|x_g| / 254) * sum_{i in g} |w_i|."""
    xg = x.double().reshape(*x.shape[:-1], -1, 32)
    half_step = xg.abs().amax(-1) / 254  # [..., groups]
    wg = dense.double().abs().reshape(dense.shape[0], -1, 32).sum(-1)  # [rows, groups]
    return half_step @ wg.T


@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_qmatmul_equals_the_float_product_within_int8_activation_rounding(name, rows, cols):
    rng = np.random.default_rng()  # fresh data every run: the bound holds for any
    seed = int(rng.integers(1 << 31))
    part = _blocks(QTYPES[name], rows, cols, np.random.default_rng(seed))
    dense = dequantize(part.data, part.qtype)
    weight = pack_qmatmul([part])
    torch.manual_seed(seed)
    for batch in (1, 3, 6):  # 6: one block of 4 activation rows and two single ones
        x = torch.randn(batch, cols) * torch.rand(batch, cols // 32).repeat_interleave(32, 1) * 4
        ref = x.double() @ dense.double().T
        bound = _rounding_bound(x, dense)
        out = cpu_qmatmul.qmatmul(x, weight)
        assert out.shape == (batch, rows) and out.dtype == torch.float32
        # fp32 accumulation over the groups adds ~1e-6 relative to the bound
        assert ((out.double() - ref).abs() <= bound * 1.001 + 1e-4 * ref.abs() + 1e-5).all(), f"seed {seed}"
        out_bf16 = cpu_qmatmul.qmatmul(x.bfloat16(), weight).double()
        ref_bf16 = x.bfloat16().double() @ dense.double().T
        bound_bf16 = _rounding_bound(x.bfloat16().float(), dense) * 1.001 + ref_bf16.abs() * 2**-8 + 1e-5
        assert out_bf16.shape == (batch, rows) and ((out_bf16 - ref_bf16).abs() <= bound_bf16).all(), f"seed {seed}"


@pytest.mark.parametrize("name", list(QTYPES))
def test_qmatmul_is_exact_when_the_activations_are_already_int8(name):
    """Integer activations whose every group reaches +-127 quantize to themselves: the output is the checkpoint's
    matmul to float rounding, so any slip in the tile layout (a row, a chunk, a nibble) shows."""
    rng = np.random.default_rng()
    part = _blocks(QTYPES[name], 48, 128, rng)
    dense = dequantize(part.data, part.qtype)
    x = torch.from_numpy(rng.integers(-127, 128, (5, 128))).float()
    x[:, ::32] = 127
    ref = x.double() @ dense.double().T
    for vector in (True, False):
        out = cpu_qmatmul.qmatmul(x, pack_qmatmul([part]), vector=vector).double()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)


def test_vector_and_scalar_paths_agree():
    rng = np.random.default_rng()
    for qtype in QTYPES.values():
        weight = pack_qmatmul([_blocks(qtype, 40, 96, rng)])
        x = torch.randn(7, 96)
        torch.testing.assert_close(cpu_qmatmul.qmatmul(x, weight), cpu_qmatmul.qmatmul(x, weight, vector=False),
                                   rtol=1e-5, atol=1e-5)
    assert cpu_qmatmul.isa() in ("avx512-vnni", "scalar")


def test_fused_row_blocks_and_mixed_4_bit_types_stack():
    """q, k and v as one matmul; a Q4_0 block beside Q4_1 ones takes min -8d, exact in fp16."""
    rng = np.random.default_rng()
    parts = [_blocks(Q.Q4_1, 32, 64, rng), _blocks(Q.Q4_0, 16, 64, rng), _blocks(Q.Q4_1, 8, 64, rng)]
    assert can_pack_qmatmul(parts)
    assert not can_pack_qmatmul([_blocks(Q.Q4_1, 16, 64, rng), _blocks(Q.Q8_0, 16, 64, rng)])
    assert not can_pack_qmatmul([_blocks(Q.Q4_1, 16, 64, rng), _blocks(Q.Q4_1, 16, 96, rng)])
    weight = pack_qmatmul(parts)
    assert weight.out_features == 56 and weight.packed.shape == (4, 2 * 256) and weight.mins.numel()
    dense = torch.cat([dequantize(p.data, p.qtype) for p in parts])
    x = torch.randn(2, 64)
    out = cpu_qmatmul.qmatmul(x, weight).double()
    assert ((out - x.double() @ dense.double().T).abs() <= _rounding_bound(x, dense) * 1.001 + 1e-5).all()


def test_padded_rows_are_never_written():
    u = torch.randint(0, 16, (20, 64), dtype=torch.uint8)
    d = torch.rand(20, 2).half()
    weight = pack_unsigned(u, d, None, 4, 8)
    assert weight.packed.shape[0] == 2 and weight.out_features == 20
    assert cpu_qmatmul.qmatmul(torch.randn(3, 64), weight).shape == (3, 20)


def test_torch_compile_takes_qmatmul_as_one_op_without_graph_breaks():
    weight = pack_qmatmul([_blocks(Q.Q4_1, 32, 64, np.random.default_rng(0))])

    def f(x):
        return torch.relu(torch.ops.ferry_cpu.qmatmul(x * 2, weight.packed, weight.scales, weight.mins, 4, 0, 32))

    x = torch.randn(3, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # the fake kernel gives the graph its shapes
    torch.testing.assert_close(compiled(x), f(x))
