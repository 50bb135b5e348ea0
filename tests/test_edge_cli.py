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
    return subprocess.run([sys.executable, "-m", "ferry.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _start_cloud(split: int, token: str) -> tuple[subprocess.Popen, int]:
    """A `ferry cloud` process, returned once its port accepts connections (or it has died: the test sees why)."""
    port = free_port()
    env = {**os.environ, "FERRY_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", "cloud", "--split", str(split), "--listen",
                             f"127.0.0.1:{port}", "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
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


def test_edge_json_gives_the_tokens_of_ferry_generate(cloud_process):
    _, port = cloud_process
    local = _ferry("generate", "--chat", PROMPT, "--max-tokens", "16", "--json", "--device", "cpu")
    edge = _ferry("edge", "--cloud", f"127.0.0.1:{port}", "--split", "12", "--chat", PROMPT, "--max-tokens", "16",
                  "--json", "--device", "cpu", "--codec", "fp32")
    assert local.returncode == 0 and edge.returncode == 0, edge.stderr
    ours, theirs = json.loads(edge.stdout), json.loads(local.stdout)
    assert ours["completions"][0]["token_ids"] == theirs["completions"][0]["token_ids"]
    assert "Paris" in ours["completions"][0]["text"]
    link = ours["completions"][0]["link"]
    assert link["round_trips"] == len(ours["completions"][0]["token_ids"]) and link["bytes_sent_per_token"] > 0


def test_edge_split_auto_verbose_prints_its_prediction_table(cloud_process):
    _, port = cloud_process
    out = _ferry("edge", "--cloud", f"127.0.0.1:{port}", "--split", "auto", "--min-edge-layers", "6", PROMPT,
                 "--max-tokens", "4", "--json", "--verbose", "--device", "cpu", "--codec", "int8")
    assert out.returncode == 0, out.stderr
    assert "predicted ms/token" in out.stderr
    assert 6 <= json.loads(out.stdout)["split"] <= 29


def test_edge_without_the_token_is_refused_with_one_line(cloud_process):
    _, port = cloud_process
    out = _ferry("edge", "--cloud", f"127.0.0.1:{port}", "--split", "12", "hi", "--device", "cpu", token=None)
    assert out.returncode == 2 and "FERRY_TOKEN" in out.stderr and "Traceback" not in out.stderr
    out = _ferry("edge", "--cloud", f"127.0.0.1:{port}", "--split", "12", "hi", "--device", "cpu", token="wrong")
    assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr and "Traceback" not in out.stderr


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


def test_cloud_stops_cleanly_on_sigterm():
    proc, _ = _start_cloud(3, "x")
    proc.terminate()
    try:
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        proc.kill()
