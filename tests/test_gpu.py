"""GPU checks (run on the device machine; skipped without CUDA): bf16 SmolLM2 against transformers on the
same GPU, CUDA-graph decode against eager decode, and the Llama-3-8B shape's forward against transformers.

bf16 rule: Ferry's bf16 decode and transformers round differently, so greedy paths may part at a near-tie. At every
step of Ferry's bf16 greedy continuation, transformers in fp32 on the same GPU (teacher-forced on the same prefix)
must rank Ferry's token within BF16_TIE_LOGITS of its top logit (bf16 logits near 20 step by 0.125, so a few ulps
of drift through 30 layers makes 0.5 the tie band), and at least MIN_EXACT_SHARE of all steps must be its exact
argmax. Full-prompt bf16 logits must agree with transformers' bf16 logits to a relative L2 error < 2e-2.
"""

from __future__ import annotations

import pytest
import torch

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BF16_TIE_LOGITS = 0.5
MIN_EXACT_SHARE = 0.9

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In a distant galaxy, a small robot named Pixel discovered",
    "List three uses of copper:",
    "Water boils at",
    "Translate to French: I love reading books.",
]


@pytest.fixture(scope="module")
def ferry_bf16(smollm_path):
    from ferry.model.loader import load_model

    return load_model(None, CUDA, torch.bfloat16, show_progress=False)


def _hf_on_gpu(path, dtype):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.to(CUDA).eval()


@pytest.fixture(scope="module")
def hf_bf16(smollm_path):
    return _hf_on_gpu(smollm_path, torch.bfloat16)


@pytest.fixture(scope="module")
def hf_fp32(smollm_path):
    return _hf_on_gpu(smollm_path, torch.float32)


def _prompt_ids(loaded) -> list[list[int]]:
    tok = loaded.tokenizer
    return [tok.encode(p) for p in PROMPTS[:4]] + [tok.encode_chat(p) for p in PROMPTS[4:]]


def test_bf16_full_prompt_logits_match_transformers_on_gpu(ferry_bf16, hf_bf16):
    from ferry.engine.kv_cache import KVCache

    cfg = ferry_bf16.config
    for ids in _prompt_ids(ferry_bf16):
        cache = KVCache(cfg.num_layers, ferry_bf16.model.kv_heads_per_rank, cfg.head_dim, torch.bfloat16, CUDA)
        cache.ensure(1, len(ids))
        x = torch.tensor([ids], device=CUDA)
        with torch.inference_mode():
            ours = ferry_bf16.model.full_logits(x, cache.layers)
            ref = hf_bf16(x).logits.float()
        rel = (ours - ref).norm() / ref.norm()
        print(f"bf16 logits rel L2 {rel:.2e}, max abs {(ours - ref).abs().max():.3f}")
        assert rel < 2e-2


def test_bf16_greedy_tokens_are_fp32_reference_choices_up_to_ties(ferry_bf16, hf_fp32):
    engine = Engine(ferry_bf16.model, ferry_bf16.tokenizer)
    assert engine.decode_path == ("cuda-graph, attention triton-split-k, elementwise fused Triton kernels (add+RMSNorm, "
                                  "SiLU*mul, rotary+KV write)")
    prompts = _prompt_ids(ferry_bf16)
    completions = engine.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    exact = total = 0
    for ids, c in zip(prompts, completions, strict=True):
        full = torch.tensor([ids + c.token_ids], device=CUDA)
        with torch.inference_mode():
            logits = hf_fp32(full).logits[0, len(ids) - 1 : -1].float()
        chosen = logits.gather(1, torch.tensor(c.token_ids, device=CUDA).unsqueeze(1)).squeeze(1)
        gap = logits.max(dim=1).values - chosen
        assert gap.max() <= BF16_TIE_LOGITS, f"step {int(gap.argmax())}: gap {float(gap.max()):.3f}"
        exact += int((gap == 0).sum())
        total += len(gap)
    print(f"{exact}/{total} bf16 greedy steps are the fp32 reference's exact argmax")
    assert exact >= MIN_EXACT_SHARE * total


def test_cuda_graph_decode_matches_eager_decode_token_for_token(smollm_path):
    """fp32, so that the graph's longer (bucketed) attention span cannot flip a bf16 near-tie."""
    from ferry.model.loader import load_model

    loaded = load_model(None, CUDA, torch.float32, show_progress=False)
    prompts = _prompt_ids(loaded)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    graphed = Engine(loaded.model, loaded.tokenizer, cuda_graphs=True).generate(prompts, params)
    eager = Engine(loaded.model, loaded.tokenizer, cuda_graphs=False).generate(prompts, params)
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]


def test_cuda_graph_decode_recaptured_at_a_new_context_bucket_mid_generation_matches_eager(smollm_path):
    """Prompts end just below the 256-token bucket and decode 48 tokens past it, so the graph for the next bucket
    is captured mid-generation (its warm-up writes K/V while the live rows' caches are in use). fp32, as above."""
    from ferry.bench.edge_codecs import eval_text
    from ferry.engine.cuda_graphs import MIN_CONTEXT_BUCKET
    from ferry.engine.static_engine import StaticBatchEngine
    from ferry.model.loader import load_model

    loaded = load_model(None, CUDA, torch.float32, show_progress=False)
    ids = loaded.tokenizer.encode(eval_text())
    prompts = [ids[:240], ids[100:330]]  # two rows of different lengths (240, 230), both below the bucket's end
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    graphed_engine = StaticBatchEngine(loaded.model, loaded.tokenizer, cuda_graphs=True)
    graphed_engine.cache.ensure(2, 1024)  # room for a full second bucket (512), not just the request's length
    graphed = graphed_engine.generate(prompts, params)
    assert sorted(graphed_engine.graphs.graphs) == [(2, MIN_CONTEXT_BUCKET), (2, 2 * MIN_CONTEXT_BUCKET)]
    eager = StaticBatchEngine(loaded.model, loaded.tokenizer, cuda_graphs=False).generate(prompts, params)
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]


def test_seeded_sampling_repeats_on_gpu(ferry_bf16):
    engine = Engine(ferry_bf16.model, ferry_bf16.tokenizer)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
    prompts = _prompt_ids(ferry_bf16)[:3]
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in engine.generate(prompts, params)]


def test_llama3_8b_shape_forward_matches_transformers_with_the_same_random_weights():
    """Two layers of the real Llama-3-8B shape (GQA 32/8, llama3 rope) in bf16, weights copied into transformers."""
    transformers = pytest.importorskip("transformers")
    from dataclasses import replace

    from ferry.bench.shapes import LLAMA3_8B, random_model
    from ferry.engine.kv_cache import KVCache

    cfg = replace(LLAMA3_8B, num_layers=2)
    ours = random_model(cfg, CUDA, torch.bfloat16, seed=3)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    with torch.device(CUDA):
        ref = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=torch.bfloat16).eval()
    state = {"model.embed_tokens.weight": ours.embed_tokens.weight, "model.norm.weight": ours.norm.weight,
             "lm_head.weight": ours.lm_head.weight}
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.self_attn.qkv_proj.weight.split([q, kv, kv])
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        state |= {p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                  p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
                  p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                  p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
                  p + "input_layernorm.weight": layer.input_layernorm.weight,
                  p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    x = torch.randint(0, cfg.vocab_size, (2, 300), device=CUDA)
    cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, CUDA)
    cache.ensure(2, 300)
    with torch.inference_mode():
        a = ours.full_logits(x, cache.layers)
        b = ref(x).logits.float()
    rel = (a - b).norm() / b.norm()
    print(f"llama3-8b-shape 2-layer logits rel L2 {rel:.2e}")
    assert rel < 2e-2
