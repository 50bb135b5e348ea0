"""Prompts from any bytes: text that is not UTF-8 never gives a traceback (tokenizer, Python API, CLI).

Bytes that were not UTF-8 reach Python surrogate-escaped (U+DC80..U+DCFF, as argv and file names do on POSIX);
Ferry encodes each as its byte token. A byte the vocabulary has no token for, and a lone surrogate that stands
for no byte, are refused by name. Random inputs come from fixed seeds, so a failure reproduces.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from ferry.errors import InvalidRequestError
from ferry.model.tokenizer import byte_level_alphabet

# Code point ranges the random text draws from: ASCII, controls, Latin, combining marks, CJK, emoji, private use,
# and anything outside the surrogates.
UNICODE_RANGES = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
                  (0xE000, 0xF8FF), (0x0, 0xD7FF), (0xE000, 0x10FFFF)]


@pytest.fixture(scope="module")
def tokenizer(ferry_smollm):
    return ferry_smollm.tokenizer


@pytest.fixture(scope="module")
def byte_of_char():
    return {c: b for b, c in enumerate(byte_level_alphabet())}


@pytest.fixture(scope="module")
def byte_tokens(tokenizer):
    """Bytes the default model's byte-level vocabulary has a token for (it leaves out 21, 0xFF among them)."""
    alphabet = byte_level_alphabet()
    return [b for b in range(256) if tokenizer.tokenizer.token_to_id(alphabet[b]) is not None]


def random_text(rng: random.Random, length: int) -> str:
    return "".join(chr(rng.randint(*rng.choice(UNICODE_RANGES))) for _ in range(length))


def random_bytes(rng: random.Random, allowed: list[int], length: int) -> bytes:
    """Mostly UTF-8 text with stray bytes in it: valid runs, cut characters and lone continuation bytes."""
    out = bytearray()
    while len(out) < length:
        if rng.random() < 0.5:
            out += random_text(rng, rng.randint(1, 4)).encode()[: rng.randint(1, 12)]  # possibly cut short
        else:
            out.append(rng.choice(allowed))
    return bytes(b for b in out if b in allowed)


def token_bytes(tokenizer, ids: list[int], byte_of_char: dict[str, int]) -> bytes:
    return bytes(byte_of_char[c] for i in ids for c in tokenizer.tokenizer.id_to_token(i))


def test_random_unicode_tokenizes_exactly_as_transformers_does(tokenizer, hf_smollm_tokenizer):
    rng = random.Random(11)
    for _ in range(300):
        text = random_text(rng, rng.randint(1, 40))
        assert tokenizer.encode(text) == hf_smollm_tokenizer(text, add_special_tokens=False)["input_ids"], repr(text)


def test_random_bytes_round_trip_through_their_byte_tokens(tokenizer, byte_tokens, byte_of_char):
    rng = random.Random(12)
    escaped = 0
    for _ in range(300):
        raw = random_bytes(rng, byte_tokens, rng.randint(1, 40))
        text = raw.decode("utf-8", "surrogateescape")
        escaped += text != raw.decode("utf-8", "replace")
        ids = tokenizer.encode(text)
        assert token_bytes(tokenizer, ids, byte_of_char) == raw, raw
    assert escaped > 100  # most samples did hold bytes that are not UTF-8


def test_the_issue_prompt_is_its_byte_tokens_where_the_vocabulary_has_them(tokenizer, byte_of_char):
    raw = b"abc\xc3(d\xe2\x82ef\x80"  # a cut 2-byte character, a cut 3-byte one, a lone continuation byte
    ids = tokenizer.encode(raw.decode("utf-8", "surrogateescape"))
    assert token_bytes(tokenizer, ids, byte_of_char) == raw
    assert tokenizer.decode(ids) == "abc\ufffd(d\ufffdef\ufffd"


def test_a_byte_the_vocabulary_lacks_is_refused_by_name(tokenizer):
    with pytest.raises(InvalidRequestError, match=r"byte 0xFF \(at character 3\).*no token for that byte"):
        tokenizer.encode(b"abc\xff\xfe\xc3(def".decode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("text", ["\ud83d half an emoji", "x\udfff", "\udc7f"])
def test_a_lone_surrogate_that_is_no_byte_is_refused_by_name(tokenizer, text):
    with pytest.raises(InvalidRequestError, match="lone surrogate U\\+D"):
        tokenizer.encode(text)


def test_python_api_generates_from_random_byte_and_unicode_prompts(byte_tokens):
    from ferry.api import LLM
    from ferry.engine.sampling import SamplingParams

    rng = random.Random(13)
    prompts = [random_bytes(rng, byte_tokens, 12).decode("utf-8", "surrogateescape") for _ in range(3)]
    prompts += [random_text(rng, 12) for _ in range(3)]
    llm = LLM(device="cpu")
    completions = llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
    completions += llm.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True), chat=True)
    assert all(len(c.token_ids) == 2 for c in completions)
    with pytest.raises(InvalidRequestError, match="0xFF"):
        llm.generate(["\udcff"])


def run_cli(*args: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ferry.cli", *args], capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


@pytest.mark.slow
def test_cli_answers_random_byte_and_unicode_prompts(byte_tokens):
    rng = random.Random(14)
    nonzero = [b for b in byte_tokens if b]  # an argument cannot hold NUL
    prompts = [random_bytes(rng, nonzero, rng.randint(1, 24)) for _ in range(6)]
    prompts += [random_text(rng, rng.randint(1, 24)).encode() for _ in range(6)]
    prompts = [p for p in prompts if p and b"\0" not in p]
    out = run_cli("generate", "--max-tokens", "1", "--ignore-eos", "--json", "--device", "cpu", "--", *prompts)
    assert out.returncode == 0, out.stderr.decode()
    assert b"Traceback" not in out.stderr
    doc = json.loads(out.stdout)
    assert [c["prompt"].encode("utf-8", "surrogateescape") for c in doc["completions"]] == prompts


@pytest.mark.slow
def test_cli_refuses_a_byte_without_a_token_in_one_line():
    out = run_cli("generate", b"abc\xff\xfe\xc3(def", "--max-tokens", "1", "--device", "cpu")
    assert out.returncode == 2
    lines = out.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("ferry: error: the prompt holds byte 0xFF"), lines
    assert "Traceback" not in out.stderr.decode()
