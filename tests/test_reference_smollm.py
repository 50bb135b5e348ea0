"""Ferry against Hugging Face transformers on the default model, SmolLM2-135M-Instruct (GGUF Q4_1).

Both implementations dequantize the same GGUF file to fp32 and are fed the same token ids (Ferry's
tokenizer output), so the model comparison does not depend on tokenization; the tokenizers are
compared separately.
"""

from __future__ import annotations

import pytest
import torch

from ferry.engine.engine import Engine
from ferry.engine.kv_cache import KVCache
from ferry.engine.sampling import SamplingParams

# fp32 on both sides from identical dequantized weights: only summation order differs, so logits
# (magnitude ~10-30) must agree to far better than 1e-3.
LOGIT_ATOL = 1e-3
GREEDY_TOKENS = 32

PLAIN_PROMPTS = [
    "Hi",
    "The capital of France is",
    "Q: Why is the sky blue?\nA:",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker "
    "who had never once left the valley. Every morning he opened his shop, wound the clocks on the walls, "
    "and waited for visitors who rarely came. One winter evening, a stranger knocked on the door and",
]
CHAT_PROMPTS = [
    "Reply with one word: yes or no?",  # answers in a few tokens, so EOS comes up mid-generation
    "Write a haiku about the sea.",
]


def _full_logits(loaded, ids: torch.Tensor) -> torch.Tensor:
    cfg, model = loaded.config, loaded.model
    cache = KVCache(cfg.num_layers, model.kv_heads_per_rank, cfg.head_dim, torch.float32, torch.device("cpu"))
    cache.ensure(ids.shape[0], ids.shape[1])
    with torch.inference_mode():
        return model.full_logits(ids, cache.layers)


def _hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.fixture(scope="module")
def prompt_ids(ferry_smollm) -> list[list[int]]:
    tok = ferry_smollm.tokenizer
    ids = [tok.encode(p) for p in PLAIN_PROMPTS] + [tok.encode_chat(p) for p in CHAT_PROMPTS]
    lengths = [len(i) for i in ids]
    assert len(set(lengths)) == len(lengths), f"prompt lengths should all differ (ragged batch): {lengths}"
    return ids


@pytest.fixture(scope="module")
def engine(ferry_smollm) -> Engine:
    return Engine(ferry_smollm.model, ferry_smollm.tokenizer)


@pytest.fixture(scope="module")
def one_by_one(engine, prompt_ids) -> list:
    """Ferry's greedy completion of each prompt, generated one prompt at a time."""
    return [engine.generate([ids], _greedy_params())[0] for ids in prompt_ids]


@pytest.fixture(scope="module")
def hf_greedy_tokens(hf_smollm, hf_greedy_choices, prompt_ids, one_by_one) -> list[list[int]]:
    """transformers' greedy choice at every step of Ferry's one-by-one answers, one prompt at a time (no padding):
    transformers' own greedy continuation wherever Ferry's agrees with it (see `_hf_greedy_choices`)."""
    return [hf_greedy_choices(hf_smollm, ids, c.token_ids) for ids, c in zip(prompt_ids, one_by_one, strict=True)]


def _greedy_params() -> SamplingParams:
    return SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)


def _check_completion(completion, tokenizer) -> None:
    assert len(completion.token_ids) == GREEDY_TOKENS
    assert completion.finish_reason == "length"
    assert completion.text == tokenizer.decode(completion.token_ids)


@pytest.mark.slow
def test_full_prompt_logits_match_transformers(ferry_smollm, hf_smollm, prompt_ids):
    tok = ferry_smollm.tokenizer
    chosen = [prompt_ids[1], prompt_ids[3], prompt_ids[4], prompt_ids[5]]
    errors = []
    for ids in chosen:
        x = torch.tensor([ids], dtype=torch.long)
        ours, ref = _full_logits(ferry_smollm, x), _hf_logits(hf_smollm, x)
        assert ours.shape == ref.shape == (1, len(ids), ferry_smollm.config.vocab_size)
        assert ours.dtype == torch.float32
        err = (ours - ref).abs().max().item()
        errors.append(err)
        print(f"prompt of {len(ids):3d} tokens {tok.decode(ids[:6])!r}...: max |logit error| = {err:.3e}")
        assert err < LOGIT_ATOL
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))

    # Several rows in one fresh batch (equal lengths, so the reference needs no padding either).
    width = min(len(ids) for ids in chosen)
    x = torch.tensor([ids[:width] for ids in chosen], dtype=torch.long)
    err = (_full_logits(ferry_smollm, x) - _hf_logits(hf_smollm, x)).abs().max().item()
    errors.append(err)
    print(f"batch of {len(chosen)} x {width} tokens: max |logit error| = {err:.3e}")
    assert err < LOGIT_ATOL
    print(f"overall max |logit error| = {max(errors):.3e} (bound {LOGIT_ATOL:g})")


@pytest.mark.slow
def test_greedy_32_tokens_match_transformers_one_by_one(ferry_smollm, one_by_one, prompt_ids, hf_greedy_tokens):
    mismatches = []
    for ids, completion, expected in zip(prompt_ids, one_by_one, hf_greedy_tokens, strict=True):
        _check_completion(completion, ferry_smollm.tokenizer)
        if completion.token_ids != expected:
            mismatches.append((len(ids), completion.token_ids, expected))
    assert not mismatches, "\n".join(f"prompt of {n} tokens:\n ferry {a}\n hf    {b}" for n, a, b in mismatches)


@pytest.mark.slow
def test_greedy_batched_ragged_matches_one_by_one(ferry_smollm, engine, prompt_ids, hf_greedy_tokens):
    completions = engine.generate(prompt_ids, _greedy_params())
    assert len(completions) == len(prompt_ids)
    for completion, ids, expected in zip(completions, prompt_ids, hf_greedy_tokens, strict=True):
        _check_completion(completion, ferry_smollm.tokenizer)
        assert completion.prompt_token_ids == ids
        assert completion.token_ids == expected, f"prompt of {len(ids)} tokens diverged in the ragged batch"


def test_ignore_eos_keeps_generating_past_the_end_of_turn_token(ferry_smollm, hf_greedy_tokens):
    """The short chat answer must contain EOS, or the EOS handling of the two tests above proves nothing."""
    eos = set(ferry_smollm.tokenizer.eos_token_ids)
    short_answer = hf_greedy_tokens[len(PLAIN_PROMPTS)]
    assert eos & set(short_answer[:-1])


# Varied text without multi-digit numbers: whitespace runs, newlines, contractions, code, punctuation,
# accents, CJK, emoji, and the special tokens the chat template writes.
TOKENIZER_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and trailing ones   ",
    "line one\nline two\n\n\tindented with a tab",
    "I'm sure they'll say it's what we'd've done, won't they?",
    "def add(a, b):\n    return a + b  # sum\n",
    'JSON: {"key": [1, 2, 3], "ok": true}',
    "naïve café, Größe, señor, Ελληνικά, русский",
    "日本語のテキストと中文文本",
    "emoji: 🤖🚀✨ and symbols ©®™ → ≤ ≥",
    "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n",
    "URL https://example.com/path?query=a&b=c#frag, e-mail a.b@c.org",
    "",
]


@pytest.mark.parametrize("text", TOKENIZER_TEXTS, ids=range(len(TOKENIZER_TEXTS)))
def test_tokenizer_matches_transformers(ferry_smollm, hf_smollm_tokenizer, text):
    tok = ferry_smollm.tokenizer
    ours = tok.encode(text, add_bos=False)
    ref = hf_smollm_tokenizer.encode(text, add_special_tokens=False)
    assert ours == ref
    # Round trips: decoding gives the text back (special tokens kept) and agrees with transformers.
    assert tok.decode(ours, skip_special_tokens=False) == text
    assert tok.decode(ours, skip_special_tokens=False) == hf_smollm_tokenizer.decode(ref, skip_special_tokens=False)
    assert tok.decode(ours) == hf_smollm_tokenizer.decode(ref, skip_special_tokens=True)


def test_tokenizer_adds_no_bos_by_default_for_smollm(ferry_smollm):
    tok = ferry_smollm.tokenizer
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.encode("Hello")[0] != tok.bos_token_id
    assert tok.encode("Hello", add_bos=True) == [tok.bos_token_id, *tok.encode("Hello")]


def test_tokenizer_splits_numbers_into_single_digit_tokens(ferry_smollm):
    tok = ferry_smollm.tokenizer
    ids = tok.encode("12345", add_bos=False)
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    assert tok.decode(ids) == "12345"
