"""GGUF 4/8-bit weights kept as blocks on the CPU (`--weights quantized`; the CPU default, with fp32 activations on
Ferry's qmatmul): the packed form holds exactly the checkpoint's values, the model stays close to the fp32 one, and
`auto` picks it only where it applies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from ferry.comm.group import ParallelGroup
from ferry.device import resolve_dtype
from ferry.errors import FerryError
from ferry.model.layers.quant import int4_linear
from ferry.model.loader import choose_weights, load_model
from ferry.model.weights.dequant import dequantize
from ferry.model.weights.repack import (
    QuantBlocks,
    _nibbles_and_scales,
    can_pack_int4,
    can_pack_q8_0,
    pack_int4,
    pack_q8_0,
)

CPU = torch.device("cpu")


def default_formats(layers: int = 30) -> str:
    """What the default model's matmuls become with --weights quantized: Ferry's qmatmul where it is built (unless
    FERRY_QMATMUL=0), else torch's int4 kernel."""
    from ferry.model.layers import cpu_qmatmul
    from ferry.model.layers.quant import qmatmul_unavailable

    if qmatmul_unavailable() is None:
        return f"{4 * layers} 4-bit qmatmul ({cpu_qmatmul.isa()}), 1 8-bit qmatmul ({cpu_qmatmul.isa()})"
    return f"{4 * layers} int4, 1 q8_0 as int4 pairs"


def _blocks(qtype, rows: int = 48, cols: int = 96, seed: int = 0) -> QuantBlocks:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.05, 2.0, (rows, 1)) + rng.uniform(-0.5, 0.5, (rows, 1)))
    return QuantBlocks(qtype, quantize(w.astype(np.float32), qtype), cols)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=["Q4_0", "Q4_1"])
def test_unpacked_nibbles_and_scales_rebuild_the_checkpoint_values(qtype):
    part = _blocks(qtype)
    q, scale_zero = _nibbles_and_scales(part, torch.float32)
    scale = scale_zero[..., 0].T.repeat_interleave(32, dim=1)
    zero = scale_zero[..., 1].T.repeat_interleave(32, dim=1)
    rebuilt = (q.float() - 8) * scale + zero
    torch.testing.assert_close(rebuilt, dequantize(part.data, qtype), rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=["Q4_0", "Q4_1"])
def test_int4_matmul_of_fused_row_blocks_matches_the_dequantized_weights(qtype):
    parts = [_blocks(qtype, rows=32, seed=1), _blocks(qtype, rows=16, seed=2)]  # e.g. q and k fused in one matmul
    assert can_pack_int4(parts)
    weight = pack_int4(parts, torch.bfloat16)
    assert weight.out_features == 48 and weight.group_size == 32
    x = torch.randn(3, 5, 96).bfloat16()
    dense = torch.cat([dequantize(p.data, qtype) for p in parts])
    ref = x.float() @ dense.T
    out = int4_linear(x, weight).float()
    assert out.shape == (3, 5, 48)
    assert ((out - ref).norm() / ref.norm()) < 1e-2  # bf16 activations and scales


def test_q8_0_as_int4_pairs_is_the_checkpoints_8_bit_matrix_exactly():
    """The hi/lo split loses nothing: in fp32 the pair's matmul equals the dequantized Q8_0 matmul to rounding, the
    input repeated for the two halves; in bf16 it stays at bf16's error."""
    part = _blocks(Q.Q8_0, rows=48, cols=96, seed=4)
    assert can_pack_q8_0(part) and not can_pack_q8_0(_blocks(Q.Q8_0, rows=40))
    dense = dequantize(part.data, Q.Q8_0)
    x = torch.randn(2, 3, 96)
    exact = pack_q8_0(part, torch.float32)
    assert exact.input_copies == 2 and exact.out_features == 48 and exact.scale_zero.shape == (6, 48, 2)
    torch.testing.assert_close(int4_linear(x, exact), x @ dense.T, rtol=1e-5, atol=1e-4)
    out = int4_linear(x.bfloat16(), pack_q8_0(part, torch.bfloat16)).float()
    ref = x @ dense.T
    assert ((out - ref).norm() / ref.norm()) < 1e-2


def test_blocks_torch_cannot_take_stay_out_of_int4():
    assert not can_pack_int4([_blocks(Q.Q8_0)])  # 8-bit: int4 pairs (pack_q8_0) where it is one whole matrix
    assert not can_pack_int4([_blocks(Q.Q4_1, rows=40)])  # 40 rows do not fill the kernel's tiles of 16
    assert not can_pack_int4([_blocks(Q.Q4_1, cols=64), _blocks(Q.Q4_1, cols=96)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantized_model_keeps_every_layer_matmul_int4_and_agrees_with_fp32(ferry_smollm, dtype):
    """Teacher-forced top-1 agreement and perplexity on the shipped eval text against the fp32 model, through one
    prefill (the multi-row matmuls); fp32 activations over the blocks are the CPU default where qmatmul is built."""
    from importlib.resources import files

    from ferry.bench.tp_quality import teacher_forced_logits
    from ferry.model.layers.quant import qmatmul_unavailable

    if dtype == torch.float32 and qmatmul_unavailable() is not None:
        pytest.skip(f"fp32 activations over the blocks need Ferry's qmatmul: {qmatmul_unavailable()}")
    quantized = load_model(None, CPU, dtype, show_progress=False, weights="quantized")
    cfg = ferry_smollm.config
    # The tied head keeps the table's Q8_0 blocks (8-bit qmatmul, or int4 pairs for torch's kernel).
    assert quantized.model.weight_formats() == default_formats(cfg.num_layers)
    text = files("ferry.data").joinpath("eval_text.txt").read_text()
    ids = [ferry_smollm.tokenizer.encode(text)[:200]]
    logits = [teacher_forced_logits(loaded.model, ids) for loaded in (ferry_smollm, quantized)]
    agreement = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
    targets = torch.tensor(ids[0][1:])
    nll = [torch.nn.functional.cross_entropy(lg[0, :-1], targets).item() for lg in logits]
    print(f"quantized vs fp32: top-1 agreement {agreement:.3f}, nll {nll[1]:.4f} vs {nll[0]:.4f}")
    assert agreement >= 0.93
    # measured 0.005 on torch's int4 kernel, 0.002 (fp32) and 0.015 (bf16) on qmatmul (200 tokens, 2026-12-01)
    assert abs(nll[1] - nll[0]) < 0.05


def test_auto_keeps_4_bit_blocks_only_on_one_cpu_rank_in_bf16(ferry_smollm):
    from ferry.model.weights.gguf_file import GGUFWeights

    source = GGUFWeights(ferry_smollm.path)
    single = ParallelGroup.single()
    assert choose_weights("auto", source, CPU, torch.bfloat16, single) == "quantized"
    assert choose_weights("auto", source, CPU, torch.float32, single) == "native"  # fp32 stays exact
    assert choose_weights("auto", source, torch.device("cuda"), torch.bfloat16, single) == "native"
    assert choose_weights("int8", source, CPU, torch.bfloat16, single) == "int8"
    with pytest.raises(FerryError, match="unknown weight format 'int3'"):
        choose_weights("int3", source, CPU, torch.bfloat16, single)


def test_quantized_needs_the_cpu_and_bf16_unless_qmatmul_takes_fp32(monkeypatch):
    with pytest.raises(FerryError, match="--weights int8 needs --dtype bf16"):
        load_model(None, CPU, torch.float32, show_progress=False, weights="int8")
    with pytest.raises(FerryError, match="--weights quantized runs on CPU only"):
        load_model(None, torch.device("cuda"), torch.bfloat16, show_progress=False, weights="quantized")
    monkeypatch.setenv("FERRY_QMATMUL", "0")  # torch's int4 kernel alone: fp32 activations are refused
    with pytest.raises(FerryError, match="--weights quantized needs --dtype bf16.*qmatmul.*is not in use"):
        load_model(None, CPU, torch.float32, show_progress=False, weights="quantized")


def test_default_precision_on_a_cpu_is_fp32_over_the_gguf_blocks_and_explicit_fp32_stays_exact(
        ferry_smollm, monkeypatch, tmp_path):
    from ferry.model.layers.quant import qmatmul_unavailable
    from ferry.model.loader import resolve_precision

    if qmatmul_unavailable() is not None:
        pytest.skip(f"qmatmul is not built here: {qmatmul_unavailable()}")
    gguf = ferry_smollm.path
    assert resolve_precision(None, "auto", gguf, CPU) == (torch.float32, "quantized")
    assert resolve_precision("auto", "auto", None, CPU) == (torch.float32, "quantized")  # the default model
    assert resolve_precision("fp32", "auto", gguf, CPU) == (torch.float32, "auto")  # -> native: exact
    assert resolve_precision("bf16", "auto", gguf, CPU) == (torch.bfloat16, "auto")  # -> the blocks, bf16 around
    assert resolve_precision(None, "native", gguf, CPU) == (resolve_dtype(None, CPU), "native")
    assert resolve_precision(None, "auto", gguf, CPU, world=2) == (torch.float32, "auto")  # CPU TP: exact fp32
    assert resolve_precision(None, "auto", gguf, torch.device("cuda")) == (torch.bfloat16, "auto")
    (tmp_path / "config.json").write_text("{}")  # a safetensors folder: not GGUF blocks
    assert resolve_precision(None, "auto", tmp_path, CPU) == (resolve_dtype(None, CPU), "auto")
    monkeypatch.setenv("FERRY_QMATMUL", "0")
    assert resolve_precision(None, "auto", gguf, CPU) == (resolve_dtype(None, CPU), "auto")
    with pytest.raises(FerryError, match="unknown weight format 'int3'"):
        resolve_precision(None, "int3", gguf, CPU)


def test_default_dtype_is_bf16_on_a_cpu_with_native_bf16_and_fp32_for_cpu_tp(monkeypatch):
    import ferry.device

    monkeypatch.setattr(ferry.device, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype(None, CPU) == torch.bfloat16
    assert resolve_dtype(None, CPU, tp=2) == torch.float32
    assert resolve_dtype("fp32", CPU) == torch.float32
    monkeypatch.setattr(ferry.device, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype(None, CPU) == torch.float32


def test_qmatmul_is_left_to_torch_on_a_cpu_without_vnni_unless_forced(monkeypatch):
    """Its scalar loop is slower than torch's vectorised int4 kernel: without VNNI the default keeps torch's, and
    says why; FERRY_QMATMUL=1 takes qmatmul anyway, FERRY_QMATMUL=0 refuses it everywhere."""
    from ferry.model.layers import cpu_qmatmul
    from ferry.model.layers.quant import qmatmul_unavailable

    if cpu_qmatmul.load() is not None:
        pytest.skip(f"qmatmul is not built here: {cpu_qmatmul.load()}")
    monkeypatch.delenv("FERRY_QMATMUL", raising=False)
    assert qmatmul_unavailable() is None or "VNNI" in qmatmul_unavailable()
    monkeypatch.setattr(cpu_qmatmul, "isa", lambda: "scalar")
    assert "no AVX-512 VNNI" in qmatmul_unavailable()
    monkeypatch.setenv("FERRY_QMATMUL", "1")
    assert qmatmul_unavailable() is None
    monkeypatch.setenv("FERRY_QMATMUL", "0")
    assert qmatmul_unavailable() == "FERRY_QMATMUL=0"
