"""An answer that `max_tokens` cuts inside a multi-byte character ends before that character, never in U+FFFD,
and says it stopped at the limit (finish_reason "length"): in the detokenizer, generate, its JSON and chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ferry.engine.sequence import Sequence

TEXT = "東京 🚀🎉 café"
EMOJI_PROMPT = "Write three emojis about the sea."  # greedy SmolLM2 answers "... sea:\n\n* **🌊"


def test_every_cut_of_multi_byte_text_ends_before_the_cut_character(ferry_smollm):
    tok = ferry_smollm.tokenizer
    ids = tok.encode(TEXT)
    cuts_inside = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert len(cuts_inside) >= 3, "the text must have cuts inside a character for this test to mean anything"
    for k in range(1, len(ids) + 1):
        seq = Sequence([1])
        streamed = "".join(seq.append(t, tok, frozenset(), (), max_tokens=k) for t in ids[:k])
        assert seq.finish_reason == "length"
        assert streamed == seq.text and not seq.text.endswith("\ufffd"), (k, seq.text)
        assert TEXT.startswith(seq.text), (k, seq.text)
        if k not in cuts_inside:
            assert seq.text == tok.decode(ids[:k])  # nothing dropped where the cut falls between characters


def test_a_cut_with_a_stop_string_pending_still_drops_only_the_cut_character(ferry_smollm):
    tok = ferry_smollm.tokenizer
    ids = tok.encode("ab 東京")
    k = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    seq = Sequence([1])
    streamed = "".join(seq.append(t, tok, frozenset(), ("b 東X",), max_tokens=k) for t in ids[:k])
    assert seq.finish_reason == "length" and streamed == seq.text == tok.decode(ids[:k]).rstrip("\ufffd")


def ferry(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ferry.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


@pytest.mark.slow
def test_generate_json_stream_and_chat_end_before_an_emoji_cut_by_max_tokens(ferry_smollm):
    out = ferry("generate", "--chat", EMOJI_PROMPT, "--max-tokens", "16", "--json", "--stream", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    [c] = json.loads(out.stdout)["completions"]
    assert ferry_smollm.tokenizer.decode(c["token_ids"]).endswith("\ufffd"), "the limit must cut inside a character"
    assert c["finish_reason"] == "length"
    assert c["text"] and not c["text"].endswith("\ufffd"), c["text"]
    assert "\ufffd" not in out.stderr  # the streamed text (on stderr with --json)

    out = ferry("chat", "--max-tokens", "16", "--device", "cpu", stdin=f"{EMOJI_PROMPT}\n/exit\n")
    assert out.returncode == 0, out.stderr
    answer = out.stdout.split("assistant> ", 1)[1].split("you> ", 1)[0]
    assert answer.rstrip().endswith("* **") and "\ufffd" not in answer, out.stdout
