"""Topologies: hand-written and preset ones load exactly, bad files fail by name, and this machine's links are
measured as positive alpha-beta fits (CPU: two gloo processes)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from ferry.comm.topology import (
    IB_400,
    KNOWN_DEVICES,
    NVLINK_H100,
    NVLINK_H200,
    PRESETS,
    Link,
    Topology,
    fit_alpha_beta,
    parse_sizes,
    preset,
)
from ferry.errors import FerryError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
HAND_WRITTEN = {  # "4 nodes x 8 H100, NVLink in node, 400 Gb/s between"
    "nodes": 4, "devices_per_node": 8, "device": {"name": "H100"},
    "intra_node": {"kind": "nvlink", "alpha_us": 4.9, "beta_GBps": 333},
    "inter_node": {"kind": "ib", "alpha_us": 10, "beta_GBps": 50},
}


def invoke(*args: str):
    from typer.testing import CliRunner

    from ferry.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_survives_a_json_round_trip(name, tmp_path):
    topo = preset(name)
    topo.save(tmp_path / "t.json")
    again = Topology.load(tmp_path / "t.json")
    assert again.nodes == topo.nodes and again.devices_per_node == topo.devices_per_node
    assert again.device.name == topo.device.name
    assert again.device.memory_bytes == pytest.approx(topo.device.memory_bytes, rel=1e-5)
    assert again.device.flops == pytest.approx(topo.device.flops, rel=1e-5)
    for link in ("intra_node", "inter_node", "host_link"):
        a, b = getattr(topo, link), getattr(again, link)
        assert (a is None) == (b is None)
        if a is not None:
            assert (b.alpha_s, b.beta_Bps, b.kind) == (pytest.approx(a.alpha_s, rel=1e-4),
                                                       pytest.approx(a.beta_Bps, rel=1e-5), a.kind)


def test_hand_written_topology_takes_a_known_devices_figures_and_numbers_devices_node_major():
    topo = Topology.from_json(HAND_WRITTEN)
    assert topo.total_devices == 32 and topo.device.flops == KNOWN_DEVICES["H100"].flops
    assert topo.device.memory_bytes == 80 * 2**30
    assert topo.link_between(0, 7).beta_Bps == 333e9  # same node
    assert topo.link_between(7, 8).beta_Bps == 50e9 and topo.link_between(7, 8).alpha_s == pytest.approx(10e-6)
    own = Topology.from_json({**HAND_WRITTEN, "device": {"name": "H100", "tflops": 500}})
    assert own.device.flops == 500e12  # a given figure wins over the known one


@pytest.mark.parametrize("change, message", [
    ({"inter_node": None}, "missing field 'inter_node'"),
    ({"intra_node": {"alpha_us": 4.9}}, "intra_node: missing field 'beta_GBps'"),
    ({"intra_node": {"alpha_us": 4.9, "beta_GBps": 0}}, "beta_GBps > 0"),
    ({"device": {"name": "MysteryChip"}}, "device: missing field 'memory_GiB'"),
    ({"device": {"memory_GiB": 80}}, "a device needs a name"),
    ({"nodes": "four"}, "field 'nodes' must be a number"),
    ({"devices_per_node": 0}, "devices_per_node >= 1"),
])
def test_a_topology_file_missing_or_bad_fields_is_a_clear_error(change, message, tmp_path):
    doc = {k: v for k, v in {**HAND_WRITTEN, **change}.items() if v is not None}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(FerryError, match=re.escape(message)):
        Topology.load(tmp_path / "t.json")


def test_missing_or_broken_topology_file_and_unknown_preset_are_clear_errors(tmp_path):
    with pytest.raises(FerryError, match="does not exist"):
        Topology.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{nodes: 1")
    with pytest.raises(FerryError, match="not readable JSON"):
        Topology.load(tmp_path / "bad.json")
    with pytest.raises(FerryError, match="unknown topology preset 'dgx9'.*h200x2-nvlink"):
        preset("dgx9")


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is not beside this checkout")
def test_presets_carry_the_reference_measurements():
    h200 = json.loads((REFERENCE / "2026-11-24_h200x2_links.json").read_text())
    h200_graph = json.loads((REFERENCE / "2026-11-24_h200x2_peer_hf_allreduce_graph.json").read_text())
    h100 = json.loads((REFERENCE / "2026-11-28_h100x4_links.json").read_text())
    assert NVLINK_H200.beta_Bps == pytest.approx(h200["p2p_256MB_GBs"] * 1e9, rel=0.01)
    assert NVLINK_H100.beta_Bps == pytest.approx(h100["p2p_256MB_GBs"] * 1e9, rel=0.01)
    assert NVLINK_H200.alpha_s * 1e6 == pytest.approx(h200_graph["allreduce_graph"][0]["nccl_graph_us"], rel=0.01)
    assert KNOWN_DEVICES["H200"].mem_bw_Bps == pytest.approx(h200_graph["d2d_TBs_rw"] * 1e12, rel=0.01)
    assert KNOWN_DEVICES["H200"].flops == pytest.approx(2 * 8192**3 / (h200["overlap"]["matmul_us"] * 1e-6), rel=0.01)
    host = preset("h200x2-nvlink").host_link  # the fit of the pinned host->device rows reproduces them
    for row in h200["host"]:
        assert host.seconds(row["bytes"]) * 1e6 == pytest.approx(row["h2d_pinned_us"], rel=0.25)
    assert preset("h100x8-nodes4-ib400").inter_node == IB_400


def test_alpha_beta_fit_recovers_the_line_and_stays_positive_under_noise():
    exact = [(n, 20e-6 + n / 50e9) for n in (4096, 65536, 1 << 20, 16 << 20)]
    link = fit_alpha_beta(exact)
    assert link.alpha_s == pytest.approx(20e-6, rel=1e-6) and link.beta_Bps == pytest.approx(50e9, rel=1e-6)
    noisy = [(n, t * f) for (n, t), f in zip(exact, (1.1, 0.9, 1.05, 0.97))]
    link = fit_alpha_beta(noisy)
    assert link.alpha_s == pytest.approx(20e-6, rel=0.2) and link.beta_Bps == pytest.approx(50e9, rel=0.1)
    flat = fit_alpha_beta([(4096, 30e-6), (1 << 20, 29e-6)])  # a slope of noise: still a usable link
    assert flat.alpha_s > 0 and flat.beta_Bps > 0
    with pytest.raises(ValueError):
        fit_alpha_beta([(4096, 1e-5)])


def test_sizes_parse_with_binary_suffixes_and_refuse_what_cannot_be_fitted():
    assert parse_sizes("4K, 1M,64KiB,2g") == [4096, 65536, 1 << 20, 2 << 30]
    for bad in ("4K", "4K,4K", "4K,lots", "0,4K"):
        with pytest.raises(FerryError):
            parse_sizes(bad)


def test_link_time_is_alpha_plus_bytes_over_beta():
    assert Link(10e-6, 1e9).seconds(1e6) == pytest.approx(10e-6 + 1e-3)


def test_topo_cli_prints_a_preset_and_writes_json(tmp_path):
    out = invoke("topo", "--preset", "h100x8-nodes4-ib400", "--json", str(tmp_path / "t.json"))
    assert out.exit_code == 0, out.output
    assert "4 nodes x 8 x NVIDIA H100" in out.stdout and "inter_node" in out.stdout and "ib 400G" in out.stdout
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["inter_node"] == {"kind": "ib 400G", "alpha_us": 10.0, "beta_GBps": 50.0}
    out = invoke("topo", "--preset", "nope")
    assert out.exit_code == 2 and out.stderr.startswith("ferry: error: unknown topology preset 'nope'")
    assert invoke("topo", "--preset", "h200x2-nvlink", "--sizes", "4K").exit_code == 2


def test_topo_cli_measures_this_cpu_and_two_gloo_processes(tmp_path):
    """Live: the CPU's copy rate and matmul flops, and send/recv between two gloo processes as a positive fit
    whose bigger messages take longer."""
    out = invoke("topo", "--device", "cpu", "--sizes", "4K,256K,4M", "--json", str(tmp_path / "t.json"))
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["nodes"] == 1 and doc["devices_per_node"] == 1 and doc["source"].startswith("measured")
    assert 1e8 < doc["device"]["mem_bw_GBps"] * 1e9 < 1e13 and 1e9 < doc["device"]["tflops"] * 1e12 < 1e15
    link = doc["intra_node"]
    assert link["kind"] == "gloo, 2 local processes" and link["alpha_us"] > 0 and link["beta_GBps"] > 0
    points = doc["details"]["points"]["send/recv 0-1"]
    assert [n for n, _ in points] == [4096, 256 << 10, 4 << 20] and points[-1][1] > points[0][1] > 0
    assert doc["details"]["discovery"]["cpu"]["cores"] == os.cpu_count()
    assert "gloo, 2 local processes" in out.stdout and "alpha us" in out.stdout
