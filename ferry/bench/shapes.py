"""Real architectures' shapes for speed runs with random weights (weights do not change the speed)."""

from __future__ import annotations

import zlib
from dataclasses import replace

import torch

from ferry.comm.group import ParallelGroup
from ferry.model.config import ModelConfig, RopeScaling
from ferry.model.llama import LayerSpan, LlamaForCausalLM
from ferry.model.loader import build_model

LLAMA3_8B = ModelConfig(
    architecture="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    eos_token_ids=(128001,),
)

LLAMA3_70B = replace(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64)


# Llama-3's layout at a size a CPU runs in seconds (smoke runs of the speed benchmarks, tests).
TINY = replace(LLAMA3_8B, vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
               num_kv_heads=2, head_dim=32, eos_token_ids=(8191,))

SHAPES = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "tiny": TINY}


@torch.no_grad()
def random_model(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, group: ParallelGroup | None = None,
    span: LayerSpan | None = None,
) -> LlamaForCausalLM:
    """A model of `config`'s shape with N(0, 0.02) weights and unit norms, built directly on `device` (only the
    `span` of a pipeline stage, where one is given). Each parameter draws from its own stream, seeded by its
    name, so a stage holds exactly the values the whole model holds in its layers."""
    model = build_model(config, device, dtype, group or ParallelGroup.single(), span=span)
    gen = torch.Generator(device=device)
    for name, param in model.named_parameters():
        if param.is_meta:  # another stage's
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            param.normal_(0.0, 0.02, generator=gen)
    model.rotary.build_tables(device)
    return model


def weight_bytes_per_token(model: LlamaForCausalLM) -> int:
    """Bytes a decode step must read: every matmul weight once (int8 ones at a byte each, plus scales) and the
    norms; not the embedding table, of which a step reads one row per token (a tied table counts as the head)."""
    total = 0
    for module in model.modules():
        int8 = getattr(module, "int8", None)
        if int8 is not None:
            total += int8.values.numel() + int8.scales.numel() * int8.scales.element_size()
        elif module is not model.embed_tokens:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False) if not p.is_meta)
    return total
