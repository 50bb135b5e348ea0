"""Hidden-state codecs: round-trip error per codec on real SmolLM2 hidden states, sizes, corrupt input."""

from __future__ import annotations

import pytest
import torch

from ferry.edge.codecs import Codec, CodecError
from ferry.engine.kv_cache import KVCache

# Relative L2 error bounds per base codec (measured on the hidden states below; fp32 is exact).
BOUNDS = {"fp32": 0.0, "fp16": 1e-3, "bf16": 8e-3, "int8": 1e-2, "int4": 1.2e-1}


@pytest.fixture(scope="module")
def hidden(ferry_smollm) -> torch.Tensor:
    """Real hidden states after layer 10 of SmolLM2 for a sentence: [tokens, 576], with its outlier channels."""
    model, tok, cfg = ferry_smollm.model, ferry_smollm.tokenizer, ferry_smollm.config
    ids = torch.tensor([tok.encode("The lighthouse keeper wrote a letter to the sea every winter night.")])
    cache = KVCache(10, model.kv_heads_per_rank, cfg.head_dim, torch.float32, torch.device("cpu"))
    cache.ensure(1, ids.shape[1])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        return model.run_layers(model.embed_tokens(ids), positions, cache.layers, ids.shape[1], range(10))[0]


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "int8", "int4", "int8+zstd", "int4+lz4", "fp16+zstd", "fp32+lz4"])
def test_codec_round_trip_error_is_within_its_bound(hidden, name):
    codec = Codec.parse(name)
    out = codec.decode(codec.encode(hidden), *hidden.shape)
    rel = float((out - hidden).norm() / hidden.norm())
    assert out.shape == hidden.shape and out.dtype == torch.float32
    assert rel <= BOUNDS[codec.base], f"{name}: relative error {rel:.2e}"


def test_int8_sends_at_least_3_5x_fewer_bytes_than_fp32(hidden):
    fp32 = len(Codec.parse("fp32").encode(hidden))
    int8 = len(Codec.parse("int8").encode(hidden))
    assert fp32 / int8 >= 3.5


def test_outlier_aware_int8_beats_plain_absmax_scaling(hidden):
    ratio = hidden.abs().amax(dim=1) / hidden.abs().median(dim=1).values
    assert ratio.max() > 50, "these hidden states have the huge channels the codec is built for"
    scale = hidden.abs().amax(dim=1, keepdim=True) / 127
    naive = torch.round(hidden / scale).clamp(-127, 127) * scale
    codec = Codec.parse("int8")
    ours = codec.decode(codec.encode(hidden), *hidden.shape)
    assert (ours - hidden).norm() < 0.5 * (naive - hidden).norm()


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8", "int4", "int8+zstd", "fp16+lz4"])
def test_corrupt_or_truncated_payloads_raise_codec_error(hidden, name):
    codec = Codec.parse(name)
    data = codec.encode(hidden)
    for bad in (data[:-7], data + b"xx", b"", bytes(len(data))[:10]):
        with pytest.raises(CodecError):
            codec.decode(bad, *hidden.shape)
    with pytest.raises(CodecError):
        codec.decode(data, hidden.shape[0] + 1, hidden.shape[1])


def test_unknown_codec_name_is_refused():
    with pytest.raises(CodecError, match="unknown codec"):
        Codec.parse("int3+gzip")
