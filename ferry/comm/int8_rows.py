"""Per-row int8 quantization with an outlier escape, shared by the link codecs and the compressed all-reduce.

Llama-family activations carry a few channels hundreds of times larger than the rest; one absmax scale per row
then leaves every other channel a handful of levels (plain per-row int8 in the TP all-reduce agreed with the
exact next token only 86% of the time on SmolLM2). The k largest-magnitude channels of each row travel exactly
(index + value) and the rest are scaled by their own absmax.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Int8Rows(NamedTuple):
    values: torch.Tensor  # int8 [rows, dim], outlier channels zeroed
    scales: torch.Tensor  # fp32 [rows]
    outlier_index: torch.Tensor  # int64 [rows, k]
    outlier_value: torch.Tensor  # [rows, k], the exact values


def split_outliers(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (indices [rows, k] of the k largest |x|, their values, x with them zeroed)."""
    k = min(k, x.shape[1])
    idx = x.abs().topk(k, dim=1).indices
    return idx, x.gather(1, idx), x.scatter(1, idx, 0.0)


def quantize_rows(x: torch.Tensor, outliers: int = 8) -> Int8Rows:
    idx, vals, rest = split_outliers(x.float(), outliers)
    scales = rest.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(rest / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return Int8Rows(q, scales, idx, vals)


def dequantize_rows(rows: Int8Rows) -> torch.Tensor:
    out = rows.values.float() * rows.scales.unsqueeze(1)
    return out.scatter(1, rows.outlier_index, rows.outlier_value.float())
