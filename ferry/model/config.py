"""ModelConfig: the architecture facts Ferry needs, read from a HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ferry.errors import UnsupportedModelError

# HF `architectures` / GGUF `general.architecture` values that the one Llama-family definition covers.
SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# A config.json saved from a config alone (not from a model) has no `architectures`; its `model_type` names the
# family, and Ferry runs each of these families as a causal LM.
SUPPORTED_HF_MODEL_TYPES = set(SUPPORTED_HF_ARCHITECTURES.values())
SUPPORTED_GGUF_ARCHITECTURES = {"llama", "mistral", "qwen2"}
SUPPORTED_ROPE_TYPES = {"default", "llama3", "linear"}


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"{self.num_heads} attention heads do not group evenly over {self.num_kv_heads} KV heads"
            )
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling {self.rope_scaling.rope_type!r} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})"
            )

    @property
    def max_context(self) -> int:
        """Longest sequence served exactly: a sliding window is only exact up to its own length."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def num_params(self) -> int:
        h, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * f + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + self.vocab_size * h + head + h

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if archs:  # a model class named: it must be one Ferry runs (LlamaForSequenceClassification is not)
            arch = next((SUPPORTED_HF_ARCHITECTURES[a] for a in archs if a in SUPPORTED_HF_ARCHITECTURES), None)
        else:
            arch = cfg.get("model_type") if cfg.get("model_type") in SUPPORTED_HF_MODEL_TYPES else None
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"Ferry runs {', '.join(sorted(SUPPORTED_HF_ARCHITECTURES))} "
                f"(model_type {', '.join(sorted(SUPPORTED_HF_MODEL_TYPES))})"
            )
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rs.get("rope_theta", 10000.0))
        scaling = RopeScaling(
            rope_type=rs.get("rope_type", rs.get("type", "default")),
            factor=float(rs.get("factor", 1.0)),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; Ferry runs {', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))}"
            )

        def key(name: str, default: Any = ...) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is ...:
                raise UnsupportedModelError(f"GGUF metadata {arch}.{name} is missing")
            return value

        hidden = key("embedding_length")
        heads = key("attention.head_count")
        vocab = key("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens", ()))
        scale_type = key("rope.scaling.type", "none")
        scaling = RopeScaling()
        if scale_type != "none":
            scaling = RopeScaling(rope_type=scale_type, factor=float(key("rope.scaling.factor", 1.0)))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=int(heads),
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(key("attention.key_length", int(hidden) // int(heads))),
            max_position_embeddings=int(key("context_length", 4096)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            tie_word_embeddings="output.weight" not in tensor_names,
            sliding_window=None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
        )
