"""The `ferry` command as a user runs it: answers, JSON shape, and one-line errors for bad input."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest


def ferry(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ferry.cli", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_chat_answers_capital_of_france_with_paris():
    out = ferry("generate", "--chat", "What is the capital of France?", "--max-tokens", "16", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tokens generated" in out.stderr and "tokens/s" in out.stderr


@pytest.mark.slow
def test_json_prints_exactly_one_object_with_every_field():
    out = ferry("generate", "Hello", "The sky is", "--max-tokens", "6", "--json", "--stream", "--device", "cpu",
                "--dtype", "fp32")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # the whole of stdout is one JSON document
    assert doc["device"] == "cpu" and doc["dtype"] == "fp32" and doc["model"].endswith(".gguf")  # the CLI spelling
    assert [c["prompt"] for c in doc["completions"]] == ["Hello", "The sky is"]
    for c in doc["completions"]:
        assert set(c) == {"prompt", "text", "token_ids", "finish_reason", "ttft_s", "tokens_per_s"}
        assert len(c["token_ids"]) <= 6 and c["finish_reason"] in ("stop", "length") and c["ttft_s"] > 0


BAD_INPUTS = [
    (["generate", "x", "--model", "/no/such/model.gguf"], "does not exist"),
    (["generate", "x", "--top-p", "0"], "top_p"),
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--device", "cuda"], "no cuda device"),
    (["generate", "x", "--stages", "cpu=10,cpu=20", "--pp", "2"], "--stages places every rank itself; drop --pp"),
    (["generate", "x", "--dtype", "int3"], "unknown dtype"),
    (["generate", "x", "--max-tokens", "9000"], "exceeds the model's context"),
    (["generate", "x", "--tp", "0"], "--tp must be 1 or more"),
    (["generate", "x", "--tp", "-1"], "--tp must be 1 or more"),
    (["chat", "--tp", "0"], "--tp must be 1 or more"),
    (["generate", "x", "--tp", "1", "--allreduce", "process_group"], "--allreduce process_group picks"),
    (["generate", "x", "--compressed-allreduce", "int8"], "--compressed-allreduce compresses"),
    (["chat", "--compressed-allreduce", "int8"], "--compressed-allreduce compresses"),
]


@pytest.fixture(scope="module")
def bad_input_runs():
    """Every bad-input command, run two at a time from the first test that needs one: each is a Python start-up
    and an argument check (~2 s of one core), so two side by side on a 2-core machine cost the time of one."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield {tuple(args): pool.submit(ferry, *args, *([] if "--device" in args else ["--device", "cpu"]))
               for args, _ in BAD_INPUTS}


@pytest.mark.parametrize("args, message", BAD_INPUTS)
@pytest.mark.slow
def test_bad_input_gets_one_clear_line_and_nonzero_exit(bad_input_runs, args, message):
    if "cuda" in args:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = bad_input_runs[tuple(args)].result()
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("ferry: error:")


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    out = ferry("generate", "x", "--model", str(tmp_path), "--device", "cpu")
    assert out.returncode == 2
    assert "GPTNeoXForCausalLM" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_chat_repl_answers_and_keeps_history_until_exit():
    out = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "chat", "--device", "cpu", "--max-tokens", "24"],
        input="What is the capital of France?\nAnd of Italy?\n/exit\n", capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if "assistant>" in line]
    assert len(answers) == 2, out.stdout
    assert "Paris" in answers[0] and "Rome" in answers[1], out.stdout


@pytest.mark.slow
def test_kv_memory_sizes_the_cache_and_a_fraction_on_cpu_is_refused():
    out = ferry("generate", "Hi", "--max-tokens", "2", "--device", "cpu", "--dtype", "fp32", "--kv-memory", "0.25GiB",
                "--verbose")
    assert out.returncode == 0, out.stderr
    assert "KV cache 364 blocks of 16 tokens (5808 tokens, 0.25 GiB, 0.25 GiB asked)" in out.stderr
    refused = ferry("generate", "Hi", "--device", "cpu", "--kv-memory", "0.5")
    assert refused.returncode == 2 and "--kv-memory as a fraction needs a GPU" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
