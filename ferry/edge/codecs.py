"""Codecs for the hidden states that cross the edge <-> cloud link, named so logs and benchmarks say which ran.

A codec turns a [tokens, hidden] float tensor into bytes and back. Names: fp32, fp16, bf16, int8, int4, each
optionally with "+zstd" or "+lz4" on top (e.g. "int8+zstd").

int8 is outlier-aware: Llama-family hidden states carry a few channels hundreds of times larger than the rest,
and one absmax scale per token then crushes every other channel to a handful of levels. Per token, the k
largest-magnitude channels are sent exactly (fp16 value + uint16 index) and the rest are scaled by their own
absmax. int4 uses groups of 32 channels with an fp16 scale each (plus the same outlier escape).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from ferry.comm.int8_rows import Int8Rows, dequantize_rows, quantize_rows, split_outliers
from ferry.errors import FerryError

BASE_CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
COMPRESSORS = ("zstd", "lz4")
OUTLIERS_PER_TOKEN = 8
INT4_GROUP = 32


class CodecError(FerryError):
    """Bytes that do not decode (truncated, wrong size) or an unknown codec name."""


@dataclass(frozen=True)
class Codec:
    base: str
    compressor: str | None = None

    @property
    def name(self) -> str:
        return self.base + (f"+{self.compressor}" if self.compressor else "")

    @classmethod
    def parse(cls, name: str) -> Codec:
        base, _, comp = name.partition("+")
        if base not in BASE_CODECS or (comp and comp not in COMPRESSORS):
            raise CodecError(
                f"unknown codec {name!r} (choose {', '.join(BASE_CODECS)}, optionally +{' or +'.join(COMPRESSORS)})"
            )
        return cls(base, comp or None)

    def encode(self, hidden: torch.Tensor) -> bytes:
        """hidden: [tokens, dim] (any float dtype) -> bytes."""
        if hidden.dim() != 2:
            raise CodecError(f"codec input must be [tokens, dim], got shape {tuple(hidden.shape)}")
        payload = _ENCODERS[self.base](hidden.detach().to("cpu", torch.float32).contiguous())
        return _compress(self.compressor, payload)

    def decode(self, data: bytes, tokens: int, dim: int) -> torch.Tensor:
        """bytes -> fp32 [tokens, dim]; raises CodecError when the bytes cannot be that tensor."""
        payload = _decompress(self.compressor, data, limit=tokens * dim * 4 + 64 + tokens * OUTLIERS_PER_TOKEN * 4)
        try:
            out = _DECODERS[self.base](payload, tokens, dim)
        except (ValueError, struct.error, IndexError) as exc:
            raise CodecError(f"{self.name}: payload does not decode to [{tokens}, {dim}] ({exc})") from None
        if not torch.isfinite(out).all():
            raise CodecError(f"{self.name}: payload decodes to non-finite values")
        return out


def _compress(compressor: str | None, payload: bytes) -> bytes:
    if compressor == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(payload)
    if compressor == "lz4":
        import lz4.frame

        return lz4.frame.compress(payload)
    return payload


def _decompress(compressor: str | None, data: bytes, limit: int) -> bytes:
    """Inflate one whole compressed frame: trailing bytes, a cut frame or an oversized output are errors."""
    if compressor is None:
        return data
    try:
        if compressor == "zstd":
            import zstandard

            # Check the declared size first, so a small frame cannot inflate into gigabytes.
            declared = zstandard.frame_content_size(data)
            if declared < 0 or declared > limit:
                raise CodecError(f"zstd frame declares {declared} bytes (limit {limit})")
            inflater = zstandard.ZstdDecompressor().decompressobj()
            out = inflater.decompress(data)
        else:
            import lz4.frame

            inflater = lz4.frame.LZ4FrameDecompressor()
            out = inflater.decompress(data, max_length=limit + 1)
    except CodecError:
        raise
    except Exception as exc:  # zstandard / lz4 raise their own error types on corrupt input
        raise CodecError(f"{compressor}: corrupt compressed payload ({exc})") from None
    if not inflater.eof or inflater.unused_data or len(out) > limit:
        raise CodecError(f"{compressor}: payload is not exactly one compressed frame of the expected size")
    return out


def _exact(data: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    if len(data) != count * np.dtype(dtype).itemsize:
        raise ValueError(f"expected {count * np.dtype(dtype).itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype, count=count)


def _outlier_bytes(idx: torch.Tensor, vals: torch.Tensor) -> bytes:
    return idx.to(torch.int32).numpy().astype(np.uint16).tobytes() + vals.to(torch.float16).numpy().tobytes()


def _read_outliers(data: bytes, tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    k = min(OUTLIERS_PER_TOKEN, dim)
    n = tokens * k
    idx = _exact(data[: 2 * n], np.uint16, n).astype(np.int64).reshape(tokens, k)
    vals = _exact(data[2 * n : 4 * n], np.float16, n).astype(np.float32).reshape(tokens, k)
    if (idx >= dim).any():
        raise ValueError("outlier channel index out of range")
    return torch.from_numpy(idx), torch.from_numpy(vals), 4 * n


def _enc_float(dtype: torch.dtype):
    def enc(x: torch.Tensor) -> bytes:
        return x.to(dtype).view(torch.uint8).numpy().tobytes() if dtype == torch.bfloat16 else x.to(dtype).numpy().tobytes()

    return enc


def _dec_float(dtype: torch.dtype):
    def dec(data: bytes, tokens: int, dim: int) -> torch.Tensor:
        width = torch.finfo(dtype).bits // 8
        raw = _exact(data, np.uint8, tokens * dim * width)
        return torch.from_numpy(raw.copy()).view(dtype).reshape(tokens, dim).float()

    return dec


def _enc_int8(x: torch.Tensor) -> bytes:
    rows = quantize_rows(x, OUTLIERS_PER_TOKEN)
    return (_outlier_bytes(rows.outlier_index, rows.outlier_value) + rows.scales.numpy().tobytes()
            + rows.values.numpy().tobytes())


def _dec_int8(data: bytes, tokens: int, dim: int) -> torch.Tensor:
    idx, vals, at = _read_outliers(data, tokens, dim)
    scale = torch.from_numpy(_exact(data[at : at + 4 * tokens], np.float32, tokens).copy())
    q = torch.from_numpy(_exact(data[at + 4 * tokens :], np.int8, tokens * dim).copy()).reshape(tokens, dim)
    return dequantize_rows(Int8Rows(q, scale, idx, vals))


def _enc_int4(x: torch.Tensor) -> bytes:
    tokens, dim = x.shape
    if dim % INT4_GROUP or dim % 2:
        raise CodecError(f"int4 needs a hidden size divisible by {INT4_GROUP}, got {dim}")
    idx, vals, rest = split_outliers(x, OUTLIERS_PER_TOKEN)
    groups = rest.view(tokens, dim // INT4_GROUP, INT4_GROUP)
    scale = groups.abs().amax(dim=2).clamp(min=1e-12) / 7.0
    q = torch.round(groups / scale.unsqueeze(2)).clamp(-7, 7).to(torch.int16) + 8  # 1..15 in a nibble
    flat = q.view(tokens, dim).to(torch.uint8)
    packed = flat[:, 0::2] | (flat[:, 1::2] << 4)
    return _outlier_bytes(idx, vals) + scale.to(torch.float16).numpy().tobytes() + packed.numpy().tobytes()


def _dec_int4(data: bytes, tokens: int, dim: int) -> torch.Tensor:
    if dim % INT4_GROUP or dim % 2:
        raise ValueError(f"int4 needs a hidden size divisible by {INT4_GROUP}")
    idx, vals, at = _read_outliers(data, tokens, dim)
    n_scales = tokens * dim // INT4_GROUP
    scale = torch.from_numpy(_exact(data[at : at + 2 * n_scales], np.float16, n_scales).astype(np.float32))
    packed = torch.from_numpy(_exact(data[at + 2 * n_scales :], np.uint8, tokens * dim // 2).copy())
    packed = packed.reshape(tokens, dim // 2)
    q = torch.stack((packed & 0x0F, packed >> 4), dim=2).reshape(tokens, dim).float() - 8.0
    out = (q.view(tokens, dim // INT4_GROUP, INT4_GROUP) * scale.view(tokens, -1, 1)).view(tokens, dim)
    return out.scatter(1, idx, vals)


_ENCODERS = {
    "fp32": _enc_float(torch.float32),
    "fp16": _enc_float(torch.float16),
    "bf16": _enc_float(torch.bfloat16),
    "int8": _enc_int8,
    "int4": _enc_int4,
}
_DECODERS = {
    "fp32": _dec_float(torch.float32),
    "fp16": _dec_float(torch.float16),
    "bf16": _dec_float(torch.bfloat16),
    "int8": _dec_int8,
    "int4": _dec_int4,
}
