"""`ferry serve` under torchrun, as two "nodes" on 127.0.0.1 (two torchrun invocations, c10d rendezvous, gloo):
rank 0's process serves HTTP and drives the engine, the other node's rank runs the same rank loop with the
commands passed on by rank 0. Answers equal one rank's; SIGTERM on rank 0's node stops every rank cleanly; a node
that dies ends the other with the dead rank named, and no process is left."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.parallel.launch import free_port

# Held out: none of these appear in other tests' prompts.
PROMPTS = ("Two harbours share one ferry that", "Rain on a tin roof sounds")
_SERVING = re.compile(r"serving \S+ on (http://\S+)/v1")


class Node:
    """One torchrun "node" of a two-node `ferry serve` job; its stderr is read as it comes."""

    def __init__(self, port: int, name: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name,
               "--rdzv-conf", "is_host=false",
               "-m", "ferry.cli", "serve", "--dtype", "fp32", "--device", "cpu", "--port", "0", "--timeout", "20",
               "--served-model-name", name]
        env = {k: v for k, v in os.environ.items() if k != "FERRY_API_KEY"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        self.url = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if not self.url and (m := _SERVING.search(line)):
                self.url = m.group(1)

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout_s)
        self._reader.join(10)
        return code

    @property
    def text(self) -> str:
        return "".join(self.log)


def _children(pid: int) -> list[int]:
    return _process_tree().get(pid, [])


def _process_tree() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    return children


def _descendants(root: int) -> set[int]:
    """Every process below `root` now (the torchrun agent's worker, and that worker's own engine rank)."""
    children = _process_tree()
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.fixture
def two_nodes():
    """Both nodes up and serving; yields (rank 0's node, the other node, every worker process of both)."""
    from torch.distributed import TCPStore

    port, name = free_port(), f"smollm-{os.getpid()}"
    # The rendezvous store lives here, not in either node's torchrun agent: started together, either agent could
    # host it, and an agent whose node is killed takes the store with it, so the survivor's agent fails on the lost
    # store and stops its worker before Ferry can name the dead rank (seen in CI once in three runs).
    store = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False)  # noqa: F841
    nodes = [Node(port, name) for _ in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not any(node.url for node in nodes):
            assert all(node.proc.poll() is None for node in nodes), [node.text[-2000:] for node in nodes]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        first, other = sorted(nodes, key=lambda node: not node.url)
        workers = _descendants(first.proc.pid) | _descendants(other.proc.pid)
        assert len(workers) >= 3  # rank 0's server and its engine rank, the other node's rank
        yield first, other, workers
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.proc.kill()
                node.wait(30)


def _complete(url: str, name: str, prompt: str) -> dict:
    body = json.dumps({"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    req = urllib.request.Request(url + "/v1/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_two_node_server_answers_like_one_rank_and_sigterm_stops_every_rank(two_nodes, ferry_smollm):
    first, other, workers = two_nodes
    tok = ferry_smollm.tokenizer
    reference = Engine(ferry_smollm.model, tok, kv_memory="0.25GiB")
    expected = [c.text for c in reference.generate([tok.encode(p) for p in PROMPTS],
                                                   SamplingParams(max_tokens=12, ignore_eos=True))]
    name = re.search(r"--served-model-name (\S+)", " ".join(first.proc.args)).group(1)
    answers = [_complete(first.url, name, p)["choices"][0]["text"] for p in PROMPTS]
    assert answers == expected
    os.kill(_children(first.proc.pid)[0], signal.SIGTERM)  # rank 0's process: the server
    assert first.wait(60) == 0, first.text[-2000:]
    assert other.wait(60) == 0, other.text[-2000:]  # its rank was told to stop, and exited cleanly
    assert "ferry: server stopped" in first.text
    assert not _alive(workers), "a worker outlived its job"


@pytest.mark.slow
@pytest.mark.parametrize("dies", ["other-node", "rank-0-node"])
def test_a_node_that_dies_ends_the_other_with_the_rank_named(two_nodes, dies):
    first, other, workers = two_nodes
    victim, survivor = (other, first) if dies == "other-node" else (first, other)
    victim_workers = _descendants(victim.proc.pid)
    for pid in victim_workers | {victim.proc.pid}:  # the whole node goes, agent and all
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert survivor.wait(60) != 0
    ended_in = time.monotonic() - killed_at
    assert ended_in < 30, f"the surviving node took {ended_in:.0f} s to stop"
    dead = "rank 1" if dies == "other-node" else "rank 0"
    assert re.search(rf"{dead}( failed)?, that rank died or stopped", survivor.text), survivor.text[-3000:]
    victim.wait(30)
    assert not _alive(workers), "a worker outlived its job"
