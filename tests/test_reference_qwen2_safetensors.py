"""Ferry's Hugging Face folder loader against transformers on tiny random checkpoints.

Two architectures are built with transformers, randomised, and saved sharded over several
*.safetensors files next to a small tokenizer.json:

* Qwen2: q/k/v biases, grouped-query attention (4 heads over 2 KV heads), untied LM head;
* Llama with Llama-3.1 RoPE scaling (factor 8 over an original context of 64, max 512 positions) and
  tied embeddings, so positions far past 64 exercise the scaled, blended and unscaled frequency bands.

Ferry loads each folder with `load_model(folder, cpu, fp32)` and must reproduce transformers' logits on
every position and its greedy continuations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ferry.engine.engine import Engine
from ferry.engine.kv_cache import KVCache
from ferry.engine.sampling import SamplingParams
from ferry.model.loader import load_model

transformers = pytest.importorskip("transformers", reason="the reference tests need transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 256
GREEDY_TOKENS = 16
# fp32 on both sides, same weights; logits are O(1-10) with the randomisation below, and only
# summation order differs (fused QKV / gate-up matmuls, SDPA vs. masked SDPA): ~1e-6 expected.
LOGIT_ATOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
COMMON = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    rms_norm_eps=1e-6,
)


def _qwen2_config():
    return transformers.Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=10000.0)


def _llama3_config(rope_scaling=LLAMA3_ROPE):
    return transformers.LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        max_position_embeddings=512,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
    )


ARCHS = {
    # name: (config factory, transformers model class, length of the random sequences for full logits)
    "qwen2": (_qwen2_config, "Qwen2ForCausalLM", 128),
    "llama3_rope": (_llama3_config, "LlamaForCausalLM", 320),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough for O(1) activations and well-separated logits (transformers' init is tiny)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:  # linear weight [out, in]
                param.copy_(noise / param.shape[1] ** 0.5)


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json whose vocabulary is exactly the model's ("w0" ... "w255")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))


def _build_checkpoint(folder: Path, arch: str, seed: int):
    make_config, class_name, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(make_config()).to(torch.float32).eval()
    _randomise(model, seed)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(folder, max_shard_size="100KB")
    _write_tokenizer(folder, VOCAB)
    return model


def _open_checkpoint(tmp_path_factory, arch: str):
    folder = tmp_path_factory.mktemp(arch)
    hf_model = _build_checkpoint(folder, arch, seed=1234)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1, f"expected a sharded checkpoint, got {[s.name for s in shards]}"
    loaded = load_model(folder, torch.device("cpu"), torch.float32, show_progress=False)
    return arch, folder, hf_model, loaded


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    """(arch name, folder, transformers model, Ferry LoadedModel) for one sharded random checkpoint."""
    return _open_checkpoint(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def llama3_checkpoint(tmp_path_factory):
    return _open_checkpoint(tmp_path_factory, "llama3_rope")


def _ferry_full_logits(loaded, ids: torch.Tensor) -> torch.Tensor:
    cfg, model = loaded.config, loaded.model
    cache = KVCache(cfg.num_layers, model.kv_heads_per_rank, cfg.head_dim, torch.float32, torch.device("cpu"))
    cache.ensure(ids.shape[0], ids.shape[1])
    with torch.inference_mode():
        return model.full_logits(ids, cache.layers)


def _hf_full_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_sharded_checkpoint_config_is_read_from_config_json(checkpoint):
    arch, folder, hf_model, loaded = checkpoint
    cfg = loaded.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (VOCAB, 64, 128)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 4, 2, 16)
    assert cfg.rope_theta == 10000.0
    if arch == "qwen2":
        assert cfg.architecture == "qwen2"
        assert cfg.attention_bias and not cfg.tie_word_embeddings
        assert cfg.rope_scaling.rope_type == "default"
        assert cfg.sliding_window is None
    else:
        assert cfg.architecture == "llama"
        assert cfg.tie_word_embeddings and not cfg.attention_bias
        assert cfg.max_position_embeddings == 512
        rs = cfg.rope_scaling
        assert (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor) == ("llama3", 8.0, 1.0, 4.0)
        assert rs.original_max_position_embeddings == 64
        # Tied: the LM head is the embedding matrix itself, not a copy.
        assert loaded.model.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.tokenizer.vocab_size == VOCAB


def test_sharded_checkpoint_full_logits_match_transformers(checkpoint):
    arch, _, hf_model, loaded = checkpoint
    length = ARCHS[arch][2]
    ids = _random_ids(batch=3, length=length, seed=7)
    ours, ref = _ferry_full_logits(loaded, ids), _hf_full_logits(hf_model, ids)
    assert ours.shape == ref.shape == (3, length, VOCAB)
    err = (ours - ref).abs().max().item()
    print(f"{arch}: {tuple(ids.shape)} random ids, logits up to {ref.abs().max().item():.1f}: "
          f"max |logit error| = {err:.3e} (bound {LOGIT_ATOL:g})")
    assert err < LOGIT_ATOL
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_llama3_rope_scaling_is_what_makes_the_logits_match(llama3_checkpoint):
    """Guard on the test above: ignoring the Llama-3 scaling would miss the reference by far more than the bound."""
    arch, _, hf_model, loaded = llama3_checkpoint
    unscaled = transformers.LlamaForCausalLM(_llama3_config(rope_scaling=None)).to(torch.float32).eval()
    unscaled.load_state_dict(hf_model.state_dict())
    ids = _random_ids(batch=1, length=ARCHS[arch][2], seed=7)
    ours = _ferry_full_logits(loaded, ids)
    gap = (ours - _hf_full_logits(unscaled, ids)).abs().max().item()
    print(f"llama3_rope: max |logit difference| to an unscaled-RoPE model = {gap:.3e}")
    assert gap > 1000 * LOGIT_ATOL


def test_sharded_checkpoint_greedy_16_tokens_match_transformers(checkpoint, hf_greedy):
    arch, _, hf_model, loaded = checkpoint
    gen = torch.Generator().manual_seed(99)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (1, 5, 17, 40, 90)]
    expected = [hf_greedy(hf_model, p, GREEDY_TOKENS) for p in prompts]
    engine = Engine(loaded.model, loaded.tokenizer)
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)

    one_by_one = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert one_by_one == expected

    batched = engine.generate(prompts, params)  # ragged: every prompt length differs
    assert [c.token_ids for c in batched] == expected
    assert all(c.finish_reason == "length" for c in batched)
