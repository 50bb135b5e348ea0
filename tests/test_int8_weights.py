"""Weight-only int8 (CPU, bf16 activations): close to the fp32 model, and refused where it does not apply."""

from __future__ import annotations

import pytest
import torch

from ferry.errors import FerryError
from ferry.model.layers.quant import int8_linear, quantize_rows_int8
from ferry.model.loader import load_model

CPU = torch.device("cpu")


def test_int8_rows_reconstruct_weights_within_half_a_step():
    w = torch.randn(64, 96) * torch.linspace(0.1, 3.0, 64).unsqueeze(1)
    q = quantize_rows_int8(w)
    restored = q.values.float() * q.scales.float().unsqueeze(1)
    assert ((restored - w).abs() <= q.scales.unsqueeze(1) / 2 + 1e-6).all()


def test_int8_matmul_matches_dequantized_reference():
    w, x = torch.randn(48, 64), torch.randn(3, 5, 64).bfloat16()
    q = quantize_rows_int8(w.bfloat16())
    ref = x.float() @ (q.values.float() * q.scales.float().unsqueeze(1)).T
    out = int8_linear(x, q).float()
    assert out.shape == (3, 5, 48)
    assert ((out - ref).norm() / ref.norm()) < 1e-2


def test_int8_model_agrees_with_fp32_on_next_token(ferry_smollm):
    """Teacher-forced top-1 agreement over real text: int8 weights (bf16 activations) vs the fp32 model."""
    from ferry.bench.tp_quality import teacher_forced_logits

    int8 = load_model(None, CPU, torch.bfloat16, show_progress=False, weights="int8")
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
            "movable metal type, oil-based ink and a wooden press. Within decades, printed books spread across "
            "Europe, lowering their cost and changing how knowledge was shared.")
    ids = [ferry_smollm.tokenizer.encode(text)]
    logits = [teacher_forced_logits(loaded.model, ids) for loaded in (ferry_smollm, int8)]
    agreement = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
    print(f"int8 vs fp32 top-1 agreement: {agreement:.3f} over {len(ids[0])} positions")
    assert agreement >= 0.9


def test_int8_needs_bf16_activations():
    with pytest.raises(FerryError, match="bf16"):
        load_model(None, CPU, torch.float32, show_progress=False, weights="int8")
