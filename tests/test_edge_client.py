"""The edge client as a user meets it: it holds only its share of the model, checks everything with the cloud
before reading weights, and gives up (or falls back) fast and for the right reason when the cloud dies."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from ferry.edge.cloud import CloudServer
from ferry.edge.edge import EdgeClient, LinkError, reconnect_delay
from ferry.edge.protocol import ProtocolError
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError
from ferry.model.loader import load_layers, open_partial

TOKEN = "client-token-" + os.urandom(4).hex()
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prompt_ids(ferry_smollm) -> list[int]:
    return ferry_smollm.tokenizer.encode_chat("Write a short poem about rivers.")


@pytest.fixture(scope="module")
def reference(ferry_smollm, prompt_ids) -> list[int]:
    return Engine(ferry_smollm.model, ferry_smollm.tokenizer).generate([prompt_ids], GREEDY)[0].token_ids


@pytest.fixture
def cloud(start_cloud):
    return lambda split=1: start_cloud(split, TOKEN)


def _address(server: CloudServer) -> list[str]:
    return [f"127.0.0.1:{server.port}"]


def _materialised(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.device.type != "meta"}


# --- item: an edge holds layers 0..K-1, not the whole model ---------------------------------------------------


def test_partial_model_holds_only_the_first_k_layers_and_the_final_norm(ferry_smollm):
    partial = open_partial(None, CPU, torch.float32)
    assert _materialised(partial.model).keys() == {"norm.weight"}
    load_layers(partial, 4)
    held = _materialised(partial.model)
    assert {name.split(".")[1] for name in held if name.startswith("layers.")} == {"0", "1", "2", "3"}
    layer_bytes = sum(p.numel() * p.element_size() for p in ferry_smollm.model.layers[0].parameters())
    norm_bytes = partial.model.norm.weight.numel() * 4
    assert sum(p.numel() * p.element_size() for p in held.values()) == 4 * layer_bytes + norm_bytes
    full = dict(ferry_smollm.model.named_parameters())
    assert all(torch.equal(p, full[name]) for name, p in held.items())


def _resident_kib_of_mapping(address: int) -> int:
    """This process's resident pages (KiB) of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            field = line.split()
            if "-" in field[0] and not field[0].endswith(":"):
                low, high = (int(x, 16) for x in field[0].split("-"))
                inside = low <= address < high
            elif inside and field[0] == "Rss:":
                return int(field[1])
    raise AssertionError(f"no mapping holds address {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_partial_model_keeps_no_checkpoint_page_and_no_vocabulary_it_has_read(ferry_smollm):
    """Pages of the memory-mapped GGUF that a read touched count as the edge's resident memory until it drops them
    (~2 MiB a SmolLM2 layer), and the vocabulary in the header's metadata is in the tokenizer once it is built."""
    partial = open_partial(None, CPU, torch.bfloat16)
    mapping = partial.source.buffer.ctypes.data
    assert _resident_kib_of_mapping(mapping) == 0
    assert not [key for key in partial.source.metadata if key.startswith("tokenizer.ggml.t")]
    assert partial.tokenizer.encode_chat("hello") == ferry_smollm.tokenizer.encode_chat("hello")
    load_layers(partial, 4)
    assert _resident_kib_of_mapping(mapping) == 0


def test_row_lookup_embedding_gives_the_rows_of_the_dense_table(ferry_smollm):
    partial = open_partial(None, CPU, torch.float32)
    ids = torch.tensor([[1, 5, 1, 49151, 7], [0, 0, 300, 2, 9]])
    assert torch.equal(partial.model.embed_tokens(ids), ferry_smollm.model.embed_tokens(ids))
    with pytest.raises(IndexError, match="outside the vocabulary"):
        partial.model.embed_tokens(torch.tensor([[49152]]))


def test_completing_a_partial_model_gives_the_whole_model(ferry_smollm):
    partial = open_partial(None, CPU, torch.float32)
    load_layers(partial, 2)
    load_layers(partial, None)
    assert not partial.partial and partial.source is None
    ours, theirs = dict(partial.model.named_parameters()), dict(ferry_smollm.model.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_split_edge_reads_only_layers_below_k_and_answers_exactly(cloud, prompt_ids, reference):
    partial = open_partial(None, CPU, torch.float32)
    client = EdgeClient(partial, _address(cloud(1)), 4, TOKEN, timeout_s=20)
    try:
        completion, stats = client.generate(prompt_ids, GREEDY)
    finally:
        client.close()
    assert completion.token_ids == reference
    assert partial.layers_read == 4
    assert all(p.device.type == "meta" for layer in partial.model.layers[4:] for p in layer.parameters())
    figures = stats.as_dict(len(completion.token_ids))
    assert 0 < figures["rss_mib"] <= figures["peak_rss_mib"]


def test_local_fallback_reads_the_whole_model_once_the_cloud_accepts(cloud):
    partial = open_partial(None, CPU, torch.float32)
    client = EdgeClient(partial, _address(cloud(1)), 4, TOKEN, timeout_s=20, fallback="local")
    try:
        assert partial.layers_read == 0
        client.connect()
        assert not partial.partial
    finally:
        client.close()


def test_split_auto_reads_the_layers_it_measures_then_those_it_chose(cloud, prompt_ids, reference):
    partial = open_partial(None, CPU, torch.float32)
    client = EdgeClient(partial, _address(cloud(1)), None, TOKEN, timeout_s=20, min_edge_layers=3)
    try:
        completion, _ = client.generate(prompt_ids, GREEDY)
    finally:
        client.close()
    assert completion.token_ids == reference
    assert client.split >= 3 and partial.layers_read == client.split


# --- item: every argument and the token checked with the cloud before any weight is read ----------------------


@pytest.mark.parametrize("token, cloud_split, edge_split, error", [
    ("wrong-token", 1, 4, "UNAUTHENTICATED"),
    (TOKEN, 8, 4, "split 4 is not served"),
])
def test_cloud_refusals_come_before_any_weight_is_read(cloud, token, cloud_split, edge_split, error):
    partial = open_partial(None, CPU, torch.float32)
    client = EdgeClient(partial, _address(cloud(cloud_split)), edge_split, token, timeout_s=20)
    with pytest.raises((LinkError, ProtocolError), match=error):
        client.connect()
    client.close()
    assert partial.layers_read == 0


def test_wrong_token_with_split_auto_is_refused_before_any_weight_is_read(cloud):
    partial = open_partial(None, CPU, torch.float32)
    client = EdgeClient(partial, _address(cloud(1)), None, "wrong-token", timeout_s=20)
    with pytest.raises(LinkError, match="UNAUTHENTICATED"):
        client.connect()
    client.close()
    assert partial.layers_read == 0


@pytest.mark.parametrize("kw, error", [
    ({"codec": "int9"}, "codec"),
    ({"split": 30}, "--split must be between 1 and 29"),
    ({"fallback": "remote"}, "unknown fallback"),
    ({"reconnects": -1}, "--reconnects"),
    ({"timeout_s": 0}, "--timeout"),
    ({"gamma_max": 0}, "--gamma-max"),
])
def test_bad_arguments_are_refused_before_the_link_and_the_weights(kw, error):
    partial = open_partial(None, CPU, torch.float32)
    args = {"split": 4, **kw}
    with pytest.raises(FerryError, match=error):
        EdgeClient(partial, ["127.0.0.1:9"], args.pop("split"), TOKEN, **args)
    assert partial.layers_read == 0


@pytest.mark.parametrize("address", ["notanaddress", "127.0.0.1", "host:99999", "http://cloud:80", "a b:7070",
                                     "127.0.0.1:0"])
def test_invalid_cloud_address_is_refused_without_resolving_any_name(monkeypatch, address):
    def no_lookups(*args, **kwargs):
        raise AssertionError(f"a name was resolved: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookups)
    monkeypatch.setattr(socket, "gethostbyname", no_lookups)
    partial = open_partial(None, CPU, torch.float32)
    with pytest.raises(FerryError, match="HOST:PORT|port 0"):
        EdgeClient(partial, [address], 4, TOKEN)


def test_valid_cloud_addresses_are_accepted_as_written():
    partial = open_partial(None, CPU, torch.float32)
    targets = ["127.0.0.1:7070", "[::1]:7070", "localhost:7070", "cloud.example.org:7070"]
    assert EdgeClient(partial, targets, 4, TOKEN).clouds == targets


# --- item: a dead cloud is noticed in milliseconds, and the message says why -----------------------------------


def _stop_after(server: CloudServer, n: int, stopped_at: list[float]):
    """on_token that stops the cloud after `n` tokens and records when (time.time(), as log records do)."""
    seen = []

    def on_token(token, text):
        seen.append(token)
        if len(seen) == n:
            server.stop(0)
            stopped_at.append(time.time())

    return on_token


def test_reconnect_backoff_is_hundreds_of_ms_and_bounded():
    delays = [reconnect_delay(n) for n in range(1, 12)]
    assert delays[:3] == [0.1, 0.2, 0.4]
    assert max(delays) == 1.0 and delays == sorted(delays)


# Both tests below took 2 x the 10 s reply timeout before: each reconnect was refused at once, and then the edge
# sent its next step down the dead link and waited for an answer. Now: 0.1 + 0.2 s of backoff and two refusals.


def test_refused_reconnects_give_up_fast_and_name_the_refusal(ferry_smollm, cloud, prompt_ids):
    server = cloud(12)
    client = EdgeClient(ferry_smollm, _address(server), 12, TOKEN, timeout_s=10, reconnects=2)
    stopped_at: list[float] = []
    with pytest.raises(LinkError) as caught:
        client.generate(prompt_ids, GREEDY, on_token=_stop_after(server, 5, stopped_at))
    gave_up_s = time.time() - stopped_at[0]
    client.close()
    message = str(caught.value)
    assert "refused the connection" in message and "gave up after 2 reconnect(s)" in message
    assert "did not answer" not in message
    assert gave_up_s < 1.5, f"gave up {gave_up_s:.2f} s after the cloud died"


def test_local_fallback_starts_within_a_second_of_a_refused_reconnect(ferry_smollm, cloud, prompt_ids, reference,
                                                                      caplog):
    server = cloud(12)
    client = EdgeClient(ferry_smollm, _address(server), 12, TOKEN, timeout_s=10, reconnects=2, fallback="local")
    stopped_at: list[float] = []
    with caplog.at_level("WARNING", logger="ferry.edge"):
        completion, stats = client.generate(prompt_ids, GREEDY, on_token=_stop_after(server, 5, stopped_at))
    client.close()
    assert completion.token_ids == reference
    assert stats.fallback_tokens == GREEDY.max_tokens - 5 and stats.reconnects == 2
    started = [r.created for r in caplog.records if "finishing the answer locally" in r.getMessage()]
    assert len(started) == 1
    # When the local engine takes over; its own first token then costs a prefill of the history on this CPU.
    assert started[0] - stopped_at[0] < 1.0, f"fallback began {started[0] - stopped_at[0]:.2f} s after the cloud died"
