"""GGUF checkpoints through the `gguf` package: metadata, tensors by HF name, dequantized on read.

GGUF stores llama-architecture Q/K projections permuted for llama.cpp's interleaved RoPE; they are
permuted back here so the model uses the Hugging Face (rotate-half) layout for every format.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from ferry.errors import UnsupportedModelError

# Tensor types Ferry dequantizes; anything else is refused by name before loading starts.
SUPPORTED_TYPES = {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "rope_freqs.weight": "rope_freqs.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return hf_name


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleave of rotary pairs (rows of one head: pairs -> halves)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GGUFWeights:
    """A WeightSource over one .gguf file (memory-mapped by the gguf package)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = GGUFReader(self.path, "r")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.metadata: dict[str, Any] = {name: f.contents() for name, f in self.reader.fields.items()}
        unsupported = sorted({t.tensor_type.name for t in self.reader.tensors if t.tensor_type not in SUPPORTED_TYPES})
        if unsupported:
            raise UnsupportedModelError(
                f"{self.path.name}: unsupported GGUF tensor type(s) {', '.join(unsupported)} "
                f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
            )
        self.architecture = self.metadata.get("general.architecture")
        arch = self.architecture
        self._permute_heads: dict[str, int] = {}
        if arch in ("llama", "mistral"):
            n_heads = int(self.metadata[f"{arch}.attention.head_count"])
            n_kv = int(self.metadata.get(f"{arch}.attention.head_count_kv", n_heads))
            for name in self.tensors:
                if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
                    self._permute_heads[name] = n_heads
                elif name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
                    self._permute_heads[name] = n_kv

    @property
    def tensor_names(self) -> set[str]:
        return set(self.tensors)

    def has(self, name: str) -> bool:
        return gguf_name(name) in self.tensors

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        key = gguf_name(name)
        tensor = self.tensors.get(key)
        if tensor is None:
            raise UnsupportedModelError(f"{self.path.name}: tensor {key!r} (for {name}) is missing")
        data = tensor.data
        permuted = key in self._permute_heads
        # Rows are stored contiguously (quantized blocks run along a row), so a row slice reads only its
        # bytes; a column slice or a permuted tensor needs the whole tensor dequantized first.
        if dim == 0 and not permuted:
            data = data[start:stop]
            dim = None
        values = torch.from_numpy(np.array(dequantize(data, tensor.tensor_type), dtype=np.float32))
        if permuted:
            values = unpermute_qk(values, self._permute_heads[key])
        if dim is not None:
            values = values.narrow(dim, start, (stop if stop is not None else values.shape[dim]) - start)
        return values
