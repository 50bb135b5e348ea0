"""GGUF checkpoints through the `gguf` package: metadata, tensors by HF name, dequantized on read.

GGUF stores llama-architecture Q/K projections permuted for llama.cpp's interleaved RoPE; they are
permuted back here so the model uses the Hugging Face (rotate-half) layout for every format.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ferry.errors import UnsupportedModelError
from ferry.model.weights.dequant import dequantize
from ferry.model.weights.gguf_header import read_gguf
from ferry.model.weights.repack import QuantBlocks

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


def unpermute_qk(weight, n_heads: int):
    """Undo llama.cpp's per-head interleave of rotary pairs (rows of one head: pairs -> halves). Rows only move, so
    it takes dequantized values (a tensor) and stored block rows (a numpy array) alike."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _block_columns(tensor, data: np.ndarray, start: int, stop: int) -> np.ndarray | None:
    """Stored rows cut to columns [start, stop) without decoding, or None where the cut splits a block."""
    block, size = (1, 1) if tensor.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) \
        else GGML_QUANT_SIZES[tensor.qtype]
    if start % block or stop % block:
        return None
    return data[:, start // block * size : stop // block * size]


class GGUFWeights:
    """A WeightSource over one .gguf file (memory-mapped by the gguf package)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.buffer, self.metadata, self.tensors = read_gguf(self.path)
        unsupported = sorted(
            {getattr(t.qtype, "name", f"type {t.qtype}") for t in self.tensors.values() if t.qtype not in SUPPORTED_TYPES}
        )
        if unsupported:
            raise UnsupportedModelError(
                f"{self.path.name}: unsupported GGUF tensor type(s) {', '.join(unsupported)} "
                f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
            )
        self.architecture = arch = self.metadata.get("general.architecture")
        self._permute_heads: dict[str, int] = {}
        if arch in ("llama", "mistral"):
            n_heads = self.metadata.get(f"{arch}.attention.head_count")
            n_kv = self.metadata.get(f"{arch}.attention.head_count_kv", n_heads)
            if n_heads is None and any(".attn_" in name for name in self.tensors):
                raise UnsupportedModelError(f"{self.path.name}: metadata {arch}.attention.head_count is missing")
            for name in self.tensors:
                if name.startswith("blk.") and ".attn_q." in name:
                    self._permute_heads[name] = n_heads
                elif name.startswith("blk.") and ".attn_k." in name:
                    self._permute_heads[name] = n_kv

    def release_pages(self) -> None:
        """Drop this process's resident pages of the map. Pages of a file map that were read stay counted in the
        process's resident memory until it unmaps them; they remain in the page cache, so a later read costs a
        page fault, not a disk read. A split edge calls it once it has copied a layer out of the file."""
        mapping = getattr(self.buffer, "_mmap", None)  # np.memmap's own map
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    @property
    def tensor_names(self) -> set[str]:
        return set(self.tensors)

    def has(self, name: str) -> bool:
        return gguf_name(name) in self.tensors

    def get_blocks(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> QuantBlocks | None:
        """A 2-D block-quantized tensor's rows [start, stop) (dim 0) or columns on block boundaries (dim 1) as
        stored, Q/K rows put in Hugging Face order; None for float tensors and slices that cut a block."""
        key = gguf_name(name)
        tensor = self.tensors.get(key)
        if tensor is None or tensor.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                                              GGMLQuantizationType.BF16) or len(tensor.dims) != 2:
            return None
        data = tensor.rows_view(self.buffer)
        cols = tensor.dims[-1]
        if key in self._permute_heads:  # rows are whole blocks, so the row order is undone on the bytes
            data = unpermute_qk(data, self._permute_heads[key])
        if dim == 0:
            data = data[start:stop]
        elif dim == 1:
            stop = cols if stop is None else stop
            data, cols = _block_columns(tensor, data, start, stop), stop - start
            if data is None:
                return None
        return QuantBlocks(tensor.qtype, data, cols)

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        key = gguf_name(name)
        tensor = self.tensors.get(key)
        if tensor is None:
            raise UnsupportedModelError(f"{self.path.name}: tensor {key!r} (for {name}) is missing")
        data = tensor.rows_view(self.buffer)
        permuted = key in self._permute_heads
        # Rows are stored contiguously (quantized blocks run along a row), so a row slice reads only its
        # bytes, and so does a column slice on block boundaries (its blocks in every row); other column slices
        # and permuted tensors dequantize the whole tensor first.
        if dim == 0 and not permuted:
            data = data[start:stop]
            dim = None
        elif dim == 1 and not permuted and data.ndim == 2:
            stop = tensor.dims[-1] if stop is None else stop
            columns = _block_columns(tensor, data, start, stop)
            if columns is not None:
                data, dim = columns, None
        values = dequantize(data, tensor.qtype)
        if permuted:
            values = unpermute_qk(values, self._permute_heads[key])
        if dim is not None:
            values = values.narrow(dim, start, (stop if stop is not None else values.shape[dim]) - start)
        return values
