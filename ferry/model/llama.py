"""The Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral, SmolLM), written once for every parallel layout."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ferry.comm.group import ParallelGroup
from ferry.model.config import ModelConfig
from ferry.model.layers.attention import Attention, AttentionBatch, PagedBatch
from ferry.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ferry.model.layers.linear import QuantizableMatmul
from ferry.model.layers.mlp import SwiGLU
from ferry.model.layers.norm import RMSNorm
from ferry.model.layers.rotary import RotaryEmbedding
from ferry.model.weights.source import WeightSource


@dataclass(frozen=True)
class LayerSpan:
    """The decoder layers [start, stop) one pipeline stage holds; the first stage embeds, the last has the head."""

    start: int
    stop: int
    num_layers: int

    @classmethod
    def whole(cls, num_layers: int) -> LayerSpan:
        return cls(0, num_layers, num_layers)

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.num_layers

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    def __str__(self) -> str:
        return f"layers {self.start}..{self.stop - 1}"


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, group: ParallelGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.attention_bias,
            group,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, group)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, batch: AttentionBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor], next_norm: RMSNorm | None) -> torch.Tensor | None:
        """The residual stream in pre-norm form: `h` is input_layernorm(residual), already computed by the layer
        before (its last add and this norm are one step). Adds this layer's attention and MLP outputs to `residual`
        in place; returns next_norm(residual) for the next layer (None without one).

        Each add is fused with the all-reduce of the row-parallel output before it and with the norm after it
        (ParallelGroup.reduce_add_norm): one kernel on GPUs where the all-reduce engine picks that path."""
        group = self.self_attn.o_proj.group
        h = group.reduce_add_norm(self.self_attn(h, batch, kv_cache, reduce=False), residual,
                                  self.post_attention_layernorm)
        return group.reduce_add_norm(self.mlp(h, reduce=False), residual, next_norm)

    # The two halves of forward() without their all-reduces, for the micro-batch overlap schedule.
    def attention_partial(self, x, batch: AttentionBatch, kv_cache) -> torch.Tensor:
        return self.self_attn(self.input_layernorm(x), batch, kv_cache, reduce=False)

    def mlp_partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x), reduce=False)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.input_layernorm.load(source, f"{prefix}.input_layernorm")
        self.self_attn.load(source, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(source, f"{prefix}.post_attention_layernorm")
        self.mlp.load(source, f"{prefix}.mlp")


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, group: ParallelGroup | None = None) -> None:
        super().__init__()
        group = group or ParallelGroup.single()
        self.config = config
        self.group = group
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
        self.layers = nn.ModuleList(DecoderLayer(config, group) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.embed_tokens)
        # Prefill of >= 2 sequences under tensor parallelism: two micro-batches, each one's all-reduces running
        # under the other's matmuls (see _run_layers_overlapped). Set by the engine.
        self.overlap_micro_batches = False
        # A pipeline stage holds only these layers' weights (the rest stay on the meta device); see stage_forward.
        self.span = LayerSpan.whole(config.num_layers)

    @property
    def kv_heads_per_rank(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    def run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        kv_len: int,
        layers: range | None = None,
        paged: PagedBatch | None = None,
    ) -> torch.Tensor:
        """Hidden states [batch, tokens, hidden] through `layers` (all by default), one KV cache per layer run.

        A split deployment runs a prefix of the layers on one machine and the rest on another. With `paged`, the
        caches are block pools and x is one packed row of every scheduled sequence's tokens (kv_len unused).
        """
        layers = layers if layers is not None else range(len(self.layers))
        batch = AttentionBatch.build(positions, kv_len, self.rotary, x.dtype, paged)
        if (self.overlap_micro_batches and self.group.world_size > 1 and self.group.compression is None
                and x.shape[0] >= 2 and x.shape[1] > 1):
            return self._run_layers_overlapped(x, batch, kv_caches, layers)
        if not layers:
            return x
        residual = x.clone()  # updated in place layer by layer; the caller's tensor (a graph's input) stays as is
        h = self.layers[layers[0]].input_layernorm(residual)
        for i, (index, kv_cache) in enumerate(zip(layers, kv_caches, strict=True)):
            following = self.layers[layers[i + 1]].input_layernorm if i + 1 < len(layers) else None
            h = self.layers[index](h, residual, batch, kv_cache, following)
        return residual

    def _run_layers_overlapped(self, x, batch: AttentionBatch, kv_caches, layers: range) -> torch.Tensor:
        """Rows split in two micro-batches A and B; every all-reduce is started asynchronously and waited for
        only when its result is needed, after the other micro-batch's next matmuls have been issued:

            attn A -> reduce A | attn B -> reduce B | mlp A -> reduce A | mlp B -> reduce B | attn A ...
                      (runs under attn B)  (under mlp A)      (under mlp B)    (under next attn A)

        Each micro-batch owns its rows of the KV cache (views), so attention is unchanged. Exact all-reduce only.
        """
        half = x.shape[0] // 2
        xa, xb = x[:half], x[half:]
        ba, bb = batch.rows(0, half), batch.rows(half, x.shape[0])
        group = self.group
        pending_b = None
        for index, (k, v) in zip(layers, kv_caches, strict=True):
            layer = self.layers[index]
            pending_a = group.all_reduce_async(layer.attention_partial(xa, ba, (k[:half], v[:half])))
            if pending_b is not None:
                xb = xb + pending_b.wait()
            pending_b = group.all_reduce_async(layer.attention_partial(xb, bb, (k[half:], v[half:])))
            xa = xa + pending_a.wait()
            pending_a = group.all_reduce_async(layer.mlp_partial(xa))
            xb = xb + pending_b.wait()
            pending_b = group.all_reduce_async(layer.mlp_partial(xb))
            xa = xa + pending_a.wait()
        if pending_b is not None:
            xb = xb + pending_b.wait()
        return torch.cat([xa, xb])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, fp32 logits."""
        return self.lm_head(self.norm(hidden)).float()

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        kv_len: int,
    ) -> torch.Tensor:
        """input_ids, positions: [batch, tokens] -> final-norm inputs [batch, tokens, hidden] (dense cache; paged
        steps go through stage_forward)."""
        return self.run_layers(self.embed_tokens(input_ids), positions, kv_caches, kv_len)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        kv_len: int,
        logits_index: torch.Tensor | None = None,
        paged: PagedBatch | None = None,
    ) -> torch.Tensor:
        """fp32 logits [batch, vocab] for the token at `logits_index` of each row (the last when None).

        Paged: input_ids and positions are [1, tokens] and `logits_index` [n] picks tokens of that row -> [n, vocab]."""
        if paged is not None:
            return self.stage_forward(input_ids, positions, kv_caches, paged, logits_index)
        x = self.hidden_states(input_ids, positions, kv_caches, kv_len)
        if logits_index is None:
            last = x[:, -1]
        else:
            last = x[torch.arange(x.shape[0], device=x.device), logits_index]
        return self.logits(last)

    def stage_forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        paged: PagedBatch,
        logits_index: torch.Tensor,
    ) -> torch.Tensor:
        """One pipeline stage of a paged step: token ids [1, tokens] on the first stage, the previous stage's hidden
        states [1, tokens, hidden] on the others; returns hidden states for the next stage, or fp32 logits of the
        `logits_index` tokens on the last. `kv_caches` holds this stage's layers only. `forward`'s paged steps are
        this, over the whole model as its one stage."""
        span = self.span
        x = self.embed_tokens(inputs) if span.first else inputs
        x = self.run_layers(x, positions, kv_caches, 0, layers=span.layers, paged=paged)
        return self.logits(x[0].index_select(0, logits_index)) if span.last else x

    def full_logits(
        self, input_ids: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """fp32 logits for every position of a fresh batch (what references are compared on)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.logits(self.hidden_states(input_ids, positions, kv_caches, input_ids.shape[1]))

    def quantize_int8(self) -> None:
        """Weight-only int8 for every matmul (projections and LM head); norms and embedding stay as loaded."""
        for module in self.modules():
            if module is not self and hasattr(module, "quantize_int8"):
                module.quantize_int8()

    def keeps_blocks(self) -> bool:
        """Whether any matmul holds a checkpoint's own quantized blocks (after loading with keep_quantized)."""
        return any(isinstance(m, QuantizableMatmul) and m.int4 is not None for m in self.modules())

    def keep_quantized(self, keep: bool = True) -> None:
        """Before loading: matmuls whose GGUF weights are 4-bit blocks torch's int4 kernel takes keep them."""
        for module in self.modules():
            if isinstance(module, QuantizableMatmul):
                module.keep_quantized = keep

    def emulate_slowdown(self, factor: int) -> None:
        """Run every matmul `factor` times: this rank computes as a device `factor` times slower would (a
        placement's `slowdown`; ferry/parallel/placement.py)."""
        for module in self.modules():
            if isinstance(module, QuantizableMatmul):
                module.slowdown = factor

    def weight_formats(self) -> str:
        """e.g. "210 int4, 1 int8": how many matmuls hold each weight format (logs, --verbose, benchmarks)."""
        counts = Counter(m.weight_format for m in self.modules()
                         if isinstance(m, QuantizableMatmul) and not m.weight.is_meta)  # a stage's own layers
        return ", ".join(f"{n} {fmt}" for fmt, n in counts.most_common())

    def holds_embedding(self) -> bool:
        """The first stage looks tokens up; the last needs the table too where the head is tied to it."""
        return self.span.first or (self.span.last and self.config.tie_word_embeddings)

    def load(self, source: WeightSource, progress=None) -> None:
        """Fill every parameter this stage holds (all of them for the whole model) from `source`;
        `progress(i, n)` is told after each layer."""
        span = self.span
        if self.holds_embedding():
            self.embed_tokens.load(source, "model.embed_tokens")
        for done, i in enumerate(span.layers, start=1):
            self.layers[i].load(source, f"model.layers.{i}")
            if progress:
                progress(done, len(span.layers))
        self.norm.load(source, "model.norm")
        if span.last and self.config.tie_word_embeddings:
            self.lm_head.load_quantized(source, "model.embed_tokens")
        elif span.last and not self.lm_head.load_quantized(source, "lm_head"):
            self.lm_head.load(source, "lm_head")
        self.load_rotary(source)

    def load_rotary(self, source: WeightSource) -> None:
        """Rotary tables on the norm's device, with a checkpoint's per-frequency factors where it has them (GGUF
        `rope_freqs`, Llama 3)."""
        freq_factors = source.get("rope_freqs.weight") if source.has("rope_freqs.weight") else None
        self.rotary.build_tables(self.norm.weight.device, freq_factors)
