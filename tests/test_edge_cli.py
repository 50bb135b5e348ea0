"""`ferry cloud` + `ferry edge` as separate processes on loopback, as a user runs them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ferry.parallel.launch import free_port

PROMPT = "What is the capital of France?"


def _ferry(*args: str, token: str | None = "cli-secret", timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FERRY_TOKEN"}
    if token:
        env["FERRY_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "ferry.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env=env)


def _start_cloud(split: int, token: str) -> tuple[subprocess.Popen, int]:
    """A `ferry cloud` process, returned once its port accepts connections (or it has died: the test sees why)."""
    port = free_port()
    env = {**os.environ, "FERRY_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", "cloud", "--split", str(split), "--listen",
                             f"127.0.0.1:{port}", "--device", "cpu", "--dtype", "fp32"],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return proc, port


@pytest.fixture(scope="module")
def cloud_process():
    proc, port = _start_cloud(4, "cli-secret")
    assert proc.poll() is None, proc.stderr.read()
    yield proc, port
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
def test_edge_json_gives_the_tokens_of_ferry_generate(cloud_process):
    _, port = cloud_process
    local = _ferry("generate", "--chat", PROMPT, "--max-tokens", "16", "--json", "--device", "cpu", "--dtype", "fp32")
    edge = _ferry("edge", "--cloud", f"127.0.0.1:{port}", "--split", "12", "--chat", PROMPT, "--max-tokens", "16",
                  "--json", "--device", "cpu", "--dtype", "fp32", "--codec", "fp32")
    assert local.returncode == 0 and edge.returncode == 0, edge.stderr
    ours, theirs = json.loads(edge.stdout), json.loads(local.stdout)
    assert ours["completions"][0]["token_ids"] == theirs["completions"][0]["token_ids"]
    assert "Paris" in ours["completions"][0]["text"]
    link = ours["completions"][0]["link"]
    assert link["round_trips"] == len(ours["completions"][0]["token_ids"]) and link["bytes_sent_per_token"] > 0
    assert ours["weights_read"] == "layers 0..11"
    assert 0 < link["rss_mib"] <= link["peak_rss_mib"]
    assert ours["dtype"] == theirs["dtype"] == "fp32"  # the CLI's spelling, as --dtype takes it


@pytest.mark.slow
def test_edge_ignore_eos_generates_exactly_max_tokens(cloud_process):
    _, port = cloud_process
    out = _ferry("edge", "--cloud", f"127.0.0.1:{port}", "--split", "4", "--chat", PROMPT, "--max-tokens", "12",
                 "--ignore-eos", "--json", "--device", "cpu", "-v")
    assert out.returncode == 0, out.stderr
    assert "read decoder layers 0..3 of" in out.stderr  # what the mistake tests below must not see
    completion = json.loads(out.stdout)["completions"][0]
    eos = 2  # SmolLM2's <|im_end|>: the answer "The capital of France is Paris." ends with it after 8 tokens
    assert len(completion["token_ids"]) == 12 and eos in completion["token_ids"][:-1]
    assert completion["finish_reason"] == "length"


@pytest.mark.slow
def test_draft_self_runs_the_whole_model_on_the_cpu_fast_path_and_keeps_the_split_tokens(cloud_process):
    """`--draft self`: the edge drafts with its own model on the CPU's default path (the GGUF's blocks on qmatmul);
    greedy speculative rounds give the tokens plain split decoding gives."""
    _, port = cloud_process
    common = ("edge", "--cloud", f"127.0.0.1:{port}", "--split", "4", "--chat", PROMPT, "--max-tokens", "12",
              "--ignore-eos", "--json", "--device", "cpu")
    plain = _ferry(*common)
    drafted = _ferry(*common, "--draft", "self", "-v")
    assert plain.returncode == 0 and drafted.returncode == 0, drafted.stderr
    ours, theirs = json.loads(drafted.stdout)["completions"][0], json.loads(plain.stdout)["completions"][0]
    assert ours["token_ids"] == theirs["token_ids"]
    assert ours["link"]["draft_rounds"] > 0
    from ferry.model.layers.quant import qmatmul_unavailable

    if qmatmul_unavailable() is None:  # the draft's load names its kernel
        assert "quantized weights: 120 4-bit qmatmul" in drafted.stderr, drafted.stderr


@pytest.mark.parametrize("options, error", [
    ({"--codec": "int9"}, "codec"),
    ({"--cloud": "notanaddress"}, "expected HOST:PORT"),
    ({"--split": "99"}, "--split must be between 1 and 29"),
    ({"--fallback": "remote"}, "unknown fallback"),
])
@pytest.mark.slow
def test_edge_mistakes_fail_in_one_line_before_any_weight_is_read(cloud_process, options, error):
    _, port = cloud_process
    chosen = {"--cloud": f"127.0.0.1:{port}", "--split": "4", **options}
    out = _ferry("edge", *[word for pair in chosen.items() for word in pair], "hi", "--device", "cpu", "-v")
    assert out.returncode == 2 and error in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "read decoder layers" not in out.stderr and "read the whole model" not in out.stderr


@pytest.mark.slow
def test_edge_split_auto_verbose_prints_its_prediction_table(cloud_process):
    _, port = cloud_process
    out = _ferry("edge", "--cloud", f"127.0.0.1:{port}", "--split", "auto", "--min-edge-layers", "6", PROMPT,
                 "--max-tokens", "4", "--json", "--verbose", "--device", "cpu", "--codec", "int8")
    assert out.returncode == 0, out.stderr
    assert "predicted ms/token" in out.stderr
    assert 6 <= json.loads(out.stdout)["split"] <= 29


@pytest.mark.slow
def test_edge_without_the_token_is_refused_with_one_line(cloud_process):
    _, port = cloud_process
    out = _ferry("edge", "--cloud", f"127.0.0.1:{port}", "--split", "12", "hi", "--device", "cpu", token=None)
    assert out.returncode == 2 and "FERRY_TOKEN" in out.stderr and "Traceback" not in out.stderr
    out = _ferry("edge", "--cloud", f"127.0.0.1:{port}", "--split", "12", "hi", "--device", "cpu", "-v",
                 token="wrong")
    assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr and "Traceback" not in out.stderr
    assert "read decoder layers" not in out.stderr  # refused by the cloud before any weight was read


def _peak_rss_mib(*args: str, env: dict | None = None):
    """Run `ferry ARGS` and return its peak resident memory as the process itself saw it (VmHWM; a child's
    ru_maxrss would start from this test process's size at fork) and the run."""
    from ferry.bench.process_memory import run_ferry

    run = run_ferry(list(args), env={**os.environ, "FERRY_TOKEN": "cli-secret", **(env or {})})
    return run.peak_rss_mib, run


# Modules a split edge never needs: the compiler stack (torch._dynamo alone is ~144 MiB resident on the 2-core
# CPU, more than the edge's weights, cache and link together) and the other checkpoint formats' readers.
EDGE_NEVER_IMPORTS = ("torch._dynamo", "torch._inductor", "sympy", "transformers", "safetensors")


@pytest.mark.slow
def test_split4_edge_process_peaks_at_half_a_full_model_process_or_less(cloud_process, tmp_path):
    """A whole-model `ferry generate` loading the GGUF vs `ferry edge --split 4` on the same prompt, and what the
    edge imported. The whole-model process gets an empty cache folder: one that reads the packed-weight cache
    instead (ferry/model/weights/packed_cache.py) converts nothing and peaks far lower, so which one ran would
    decide the figure. Against that one the issue's 35% is out of reach: Python + torch alone hold ~218 MiB, over
    half of it (benchmarks/results/2026-11-30_edge_memory.md)."""
    _, port = cloud_process
    args = ["--chat", PROMPT, "--max-tokens", "8", "--device", "cpu"]
    full, full_proc = _peak_rss_mib("generate", *args, env={"FERRY_CACHE": str(tmp_path / "cache")})
    edge, edge_proc = _peak_rss_mib("edge", "--cloud", f"127.0.0.1:{port}", "--split", "4", *args)
    assert full_proc.returncode == 0 and edge_proc.returncode == 0
    assert edge <= 0.5 * full, f"edge {edge:.0f} MiB vs full model {full:.0f} MiB"
    assert not [m for m in EDGE_NEVER_IMPORTS if m in edge_proc.modules]


@pytest.mark.slow
def test_edge_gives_up_fast_naming_the_refusal_when_the_cloud_process_is_killed():
    import select
    import signal

    proc, port = _start_cloud(4, "cli-secret")
    env = {**os.environ, "FERRY_TOKEN": "cli-secret"}
    edge = subprocess.Popen([sys.executable, "-m", "ferry.cli", "edge", "--cloud", f"127.0.0.1:{port}", "--split",
                             "4", "--stream", "--ignore-eos", "--max-tokens", "2000", "--timeout", "30", "--device",
                             "cpu", PROMPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([edge.stdout], [], [], 120)
        assert ready and os.read(edge.stdout.fileno(), 1), "the edge streamed nothing"
        proc.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        _, stderr = edge.communicate(timeout=60)
        exited_s = time.perf_counter() - killed
    finally:
        proc.kill()
        edge.kill()
        proc.wait(30)
    message = stderr.decode().strip().splitlines()[-1]
    assert edge.returncode == 2 and message.startswith("ferry: error:")
    assert "refused the connection" in message and "did not answer" not in message, message
    assert exited_s < 3.0, f"exited {exited_s:.1f} s after the cloud was killed (--timeout 30)"


@pytest.mark.slow
def test_edge_reads_the_token_from_token_file_and_refuses_an_empty_or_missing_one(cloud_process, tmp_path):
    _, port = cloud_process
    good, empty = tmp_path / "token", tmp_path / "empty"
    good.write_text("  cli-secret\n")  # surrounding whitespace (an editor's newline) is not part of the token
    empty.write_text("\n")
    args = ["edge", "--cloud", f"127.0.0.1:{port}", "--split", "12", "hi", "--max-tokens", "2", "--device", "cpu"]
    out = _ferry(*args, "--token-file", str(good), "--json", token=None)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["completions"][0]["token_ids"]) == 2
    out = _ferry(*args, "--token-file", str(good), token="wrong")  # the file wins over $FERRY_TOKEN
    assert out.returncode == 0, out.stderr
    for path, message in ((empty, "no shared token"), (tmp_path / "absent", "cannot read token file")):
        out = _ferry(*args, "--token-file", str(path), token=None)
        errors = [line for line in out.stderr.splitlines() if line.startswith("ferry: error:")]
        assert out.returncode == 2 and len(errors) == 1 and message in errors[0], out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_cloud_stops_cleanly_on_sigterm():
    proc, _ = _start_cloud(3, "x")
    proc.terminate()
    try:
        assert proc.wait(60) == 0, proc.stderr.read()
        # the start-up line names the path that runs
        assert "cloud serving splits 3..29" in (started := proc.stderr.read()), started
        assert ": batched paged steps, pool " in started and "for layers 3..29" in started
    finally:
        proc.kill()


@pytest.mark.parametrize("options, error", [
    (["--kv-memory", "lots"], "--kv-memory 'lots': give a fraction"),
    (["--no-batching", "--kv-memory", "1GiB"], "--no-batching gives each session its own cache"),
    (["--kv-memory", "0.5"], "--kv-memory as a fraction needs a GPU"),
])
def test_cloud_pool_size_mistakes_fail_in_one_line(options, error):
    out = _ferry("cloud", "--split", "4", "--listen", "127.0.0.1:0", "--device", "cpu", *options, token="x",
                 timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("ferry: error:")]
    assert out.returncode == 2 and len(errors) == 1 and error in errors[0], out.stderr
    assert "Traceback" not in out.stderr
