"""This machine's devices and links, found and timed: what `ferry topo` shows and `ferry plan` plans on by default.

Discovery names each device and how every pair is joined: NVLink with its link count through NVML where the
`pynvml` module imports, else peer access as torch reports it (which source answered is recorded). Timing fits
time = alpha + bytes / beta per link over a few message sizes: pinned host->device copies, device->device
copies, and send/recv ping-pong between two processes (gloo on CPU, NCCL between GPUs). Under torchrun the
ping-pong runs between ranks instead, one pair inside a node and one across nodes, and rank 0 keeps the result.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import statistics
import time
from functools import partial
from itertools import combinations
from pathlib import Path

import torch

from ferry.comm.topology import Device, Topology, fit_alpha_beta

log = logging.getLogger("ferry.topology")
CPU_SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20]
GPU_SIZES = [8 << 10, 256 << 10, 8 << 20, 64 << 20]


def discover() -> dict:
    """Devices and how they are joined, without timing anything."""
    info: dict = {"hostname": socket.gethostname(), "cpu": _cpu_facts(), "gpus": [], "gpu_links": [],
                  "link_source": "none (no CUDA device)"}
    if torch.cuda.is_available():
        gpus = [_gpu_facts(i) for i in range(torch.cuda.device_count())]
        links = _nvml_links(gpus)
        info.update(gpus=gpus, link_source="nvml" if links is not None else "torch peer access",
                    gpu_links=links if links is not None else _peer_links(len(gpus)))
    return info


def _cpu_facts() -> dict:
    numa = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": platform.processor() or platform.machine(), "cores": os.cpu_count(), "usable_cores": usable,
            "numa_nodes": max(1, len(numa)), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def _gpu_facts(index: int) -> dict:
    props = torch.cuda.get_device_properties(index)
    bus = None
    if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    numa = None
    if bus:
        try:
            numa = int(Path(f"/sys/bus/pci/devices/{bus}/numa_node").read_text())
        except (OSError, ValueError):
            pass
    return {"index": index, "name": props.name, "memory_bytes": props.total_memory,
            "sm_count": props.multi_processor_count, "pci_bus_id": bus, "numa_node": numa if numa != -1 else None}


def _bus_key(bus: str | bytes) -> tuple:
    """NVML writes 00000000:18:00.0 and torch-derived ids 0000:18:00.0: compare them as numbers."""
    bus = bus.decode() if isinstance(bus, bytes) else bus
    domain, b, rest = bus.lower().split(":")
    return int(domain, 16), int(b, 16), rest


def _nvml_links(gpus: list[dict]) -> list[dict] | None:
    """NVLink count per GPU pair (direct links, or through NVSwitch: each GPU's links to the switch), None when
    NVML cannot answer (no pynvml, no driver library, a virtual machine that hides it)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # NVMLError_LibraryNotFound too: no driver library here
        log.info("NVML did not start (%s); link kinds from torch peer access", exc)
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByPciBusId(g["pci_bus_id"]) if g["pci_bus_id"]
                   else pynvml.nvmlDeviceGetHandleByIndex(g["index"]) for g in gpus]
        buses = [_bus_key(pynvml.nvmlDeviceGetPciInfo(h).busId) for h in handles]
        remotes = [_nvlink_remotes(pynvml, h) for h in handles]
        links = []
        for a, b in combinations(range(len(gpus)), 2):
            count = sum(1 for r in remotes[a] if r == buses[b])
            if not count and _nvml_p2p_nvlink(pynvml, handles[a], handles[b]):  # through NVSwitch
                count = min(len(remotes[a]), len(remotes[b]))
            kind = f"nvlink x{count}" if count else _peer_kind(a, b)
            links.append({"a": a, "b": b, "kind": kind, "nvlinks": count})
        return links
    except (pynvml.NVMLError, AttributeError) as exc:  # AttributeError: a pynvml too old for a call
        log.info("NVML could not list NVLinks (%s); link kinds from torch peer access", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvlink_remotes(pynvml, handle) -> list[tuple]:
    remotes = []
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED:
                remotes.append(_bus_key(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId))
        except pynvml.NVMLError:
            continue  # a link this GPU does not have
    return remotes


def _nvml_p2p_nvlink(pynvml, a, b) -> bool:
    try:
        return pynvml.nvmlDeviceGetP2PStatus(a, b, pynvml.NVML_P2P_CAPS_INDEX_NVLINK) == pynvml.NVML_P2P_STATUS_OK
    except pynvml.NVMLError:
        return False


def _peer_kind(a: int, b: int) -> str:
    return "peer access (pcie or nvlink)" if torch.cuda.can_device_access_peer(a, b) else "no peer access"


def _peer_links(count: int) -> list[dict]:
    return [{"a": a, "b": b, "kind": _peer_kind(a, b), "nvlinks": None} for a, b in combinations(range(count), 2)]


def _best_seconds(fn, devices: list[torch.device], reps: int) -> float:
    """Fastest of `reps` timed calls after one warm-up (the floor the hardware allows; noise only adds). Every
    GPU in `devices` is synchronised around each call (a copy between two GPUs involves both)."""
    gpus = [d for d in devices if d.type == "cuda"]

    def sync() -> None:
        for d in gpus:
            torch.cuda.synchronize(d)

    fn()
    best = math.inf
    for _ in range(reps):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


@torch.no_grad()
def measure_device(device: torch.device) -> tuple[Device, dict]:
    """Memory bandwidth from one large copy (bytes read + written, as the reference files count it) and flops
    from one square matmul; about 0.2 s on a 2-core CPU."""
    from ferry.device import cpu_has_native_bf16

    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (256 << 20)  # past every cache level
    mem_bw = 2 * nbytes / _copy_points([nbytes], device, device, reps=5 if cuda else 3)[0][1]
    dtype = torch.bfloat16 if cuda or cpu_has_native_bf16() else torch.float32
    n = 8192 if cuda else 768
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / _best_seconds(lambda: a @ b, [device], reps=10 if cuda else 3)
    if cuda:
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory
    else:
        cpu = _cpu_facts()
        name, memory = f"{cpu['model'] or 'cpu'} ({cpu['usable_cores']} cores)", cpu["memory_bytes"]
    facts = {"copy_bytes": nbytes, "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch.")}
    return Device(name, memory, mem_bw, flops), facts


def _copy_points(sizes: list[int], dst_device: torch.device, src_device: torch.device, pinned: bool = False,
                 reps: int = 10) -> list[tuple[int, float]]:
    """(bytes, fastest seconds) of one copy per size."""
    points = []
    for size in sizes:
        src = torch.ones(size, dtype=torch.uint8, device=src_device, pin_memory=pinned)
        dst = torch.empty(size, dtype=torch.uint8, device=dst_device)
        seconds = _best_seconds(lambda d=dst, s=src: d.copy_(s, non_blocking=True), [dst_device, src_device], reps)
        points.append((size, seconds))
    return points


def measure_host_link(device: torch.device, sizes: list[int]) -> list[tuple[int, float]]:
    """Pinned host -> device copies (CUDA only: a CPU has no host link)."""
    return _copy_points(sizes, device, torch.device("cpu"), pinned=True)


def measure_gpu_copies(sizes: list[int]) -> dict[str, list[tuple[int, float]]]:
    """GPU 0 -> GPU j copies (through peer access where the driver allows it), j = 1.. at most 7."""
    return {f"0->{j}": _copy_points(sizes, torch.device(f"cuda:{j}"), torch.device("cuda:0"))
            for j in range(1, min(torch.cuda.device_count(), 8))}


def ping_pong_rank(group, pairs: list[tuple[int, int]], sizes: list[int], device_type: str) -> dict:
    """Every rank runs this (spawn or torchrun target): for each pair, one-way seconds per size as half a round
    trip; the ranks outside a pair wait at its barriers. Rank 0 is in every pair and returns the points, and
    the mode they were timed in under "mode".

    GPUs: round trips captured in a CUDA graph, as Ferry's decode step runs (eagerly, each NCCL call cost
    ~45 us of host time on 2 H200s, 8 KiB and 8 MiB alike, hiding the link); eager if capture fails. CPU: the
    median single round trip. On a 2-core machine 4 KiB round trips took 63 us at best and ~2 ms for most: a
    rank that waits in a receive sleeps and pays the wake-up, and so does every all-reduce of a CPU tensor-parallel
    step, whose ranks compute between messages (TP=2 decode of a 4-layer model measured ~1.9 ms per collective)."""
    import torch.distributed as dist

    from ferry.parallel.launch import rank_device

    device = rank_device(group.rank, device_type)
    cuda, rank, pg = device.type == "cuda", group.rank, group.process_group

    def ops(buf: torch.Tensor, a: int, b: int, reps: int) -> None:
        for _ in range(reps):
            if rank == a:
                dist.send(buf, b, group=pg)
                dist.recv(buf, b, group=pg)
            elif rank == b:
                dist.recv(buf, a, group=pg)
                dist.send(buf, a, group=pg)

    def timed(fn, calls: int) -> float:
        dist.barrier(group=pg)
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) / (2 * calls)

    mode = "cuda graph" if cuda else "median single round trip"
    results: dict = {}
    for a, b in pairs:
        points = []
        for size in sizes:
            buf = torch.zeros(size // 4, dtype=torch.float32, device=device)
            ops(buf, a, b, 2)  # warm-up: NCCL connects a pair on its first send
            if not cuda:
                samples = [timed(partial(ops, buf, a, b, 1), 1) for _ in range(30 if size <= 1 << 20 else 10)]
                points.append((size, statistics.median(samples)))
                continue
            graph = _captured(partial(ops, buf, a, b, 10), device, pg) if mode == "cuda graph" else None
            if graph is None:
                mode = "eager (send/recv did not capture in a CUDA graph)"
                points.append((size, min(timed(partial(ops, buf, a, b, 10), 10) for _ in range(3))))
            else:
                points.append((size, min(timed(partial(_replay, graph, 5), 50) for _ in range(3))))
        results[f"{a}-{b}"] = points
    results["mode"] = mode
    return results


def _replay(graph, times: int) -> None:
    for _ in range(times):
        graph.replay()


def _captured(fn, device: torch.device, process_group):
    """`fn` captured in a CUDA graph, or None where any rank failed to capture (every rank must agree, or one
    would replay sends its peer never posts)."""
    import torch.distributed as dist

    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # warm-up on a side stream, as capture needs
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph):
            fn()
        ok = 1
    except RuntimeError as exc:
        log.info("NCCL send/recv did not capture in a CUDA graph (%s); timing eagerly", exc)
        graph, ok = None, 0
    flag = torch.tensor([ok], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=process_group)
    return graph if int(flag) else None


def measure_p2p(device_type: str, sizes: list[int]) -> tuple[list[tuple[int, float]], str]:
    """Send/recv between two local processes: gloo on CPU, NCCL between GPUs 0 and 1."""
    from ferry.parallel.launch import keep_multicast_off, spawn

    keep_multicast_off()
    result = spawn(2, device_type, ping_pong_rank, ([(0, 1)], sizes, device_type), timeout_s=120.0)
    return result["0-1"], result["mode"]


def measure_local(device_type: str, sizes: list[int] | None = None, for_planner: bool = False) -> Topology:
    """This machine as one node: its device measured and its links timed. `for_planner`: only the links a plan
    uses (GPU to GPU), not the host link nor the CPU's process-to-process link (a CPU is one planning device)."""
    cuda = device_type == "cuda"
    sizes = sizes or (GPU_SIZES if cuda else CPU_SIZES)
    info = discover()
    device, facts = measure_device(torch.device("cuda:0" if cuda else "cpu"))
    details: dict = {"discovery": info, "device_measure": facts, "points": {}}
    pts = details["points"]
    host = intra = None
    per_node = len(info["gpus"]) if cuda else 1
    if cuda:
        device = Device(device.name, min(g["memory_bytes"] for g in info["gpus"]), device.mem_bw_Bps, device.flops)
        if not for_planner:
            pts["host->device pinned"] = measure_host_link(torch.device("cuda:0"), sizes)
            host = fit_alpha_beta(pts["host->device pinned"], "pcie, pinned")
    if per_node > 1 and not for_planner:
        pts.update({f"copy {k}": v for k, v in measure_gpu_copies(sizes).items()})
    if per_node > 1 or not (cuda or for_planner):
        pts["send/recv 0-1"], details["send_recv_mode"] = measure_p2p(device_type, sizes)
        kind = next((x["kind"] for x in info["gpu_links"] if (x["a"], x["b"]) == (0, 1)), "")
        intra = fit_alpha_beta(pts["send/recv 0-1"], f"nccl, {kind}" if cuda else "gloo, 2 local processes")
    details["fits"] = {name: fit_alpha_beta(p).to_json() for name, p in pts.items()}
    return Topology(1, per_node, device, intra, None, host, "measured " + info["hostname"], _jsonable(details))


def measure_torchrun(device_type: str, sizes: list[int] | None = None) -> Topology | None:
    """Under torchrun: ranks grouped into nodes by (hostname, GROUP_RANK), ping-pong between rank 0 and the next
    rank of its node (intra) and the first rank of another node (inter). Rank 0 returns the Topology."""
    import torch.distributed as dist

    from ferry.parallel.launch import keep_multicast_off, rank_device, torchrun_group

    keep_multicast_off()
    sizes = sizes or (GPU_SIZES if device_type == "cuda" else CPU_SIZES)
    group = torchrun_group(device_type, timeout_s=300.0)
    where = [None] * group.world_size
    dist.all_gather_object(where, (socket.gethostname(), os.environ.get("GROUP_RANK", "")))
    nodes = list(dict.fromkeys(where))
    intra_peer = next((r for r in range(1, group.world_size) if where[r] == where[0]), None)
    inter_peer = next((r for r in range(1, group.world_size) if where[r] != where[0]), None)
    pairs = [(0, r) for r in (intra_peer, inter_peer) if r is not None]
    points = ping_pong_rank(group, pairs, sizes, device_type)
    result = None
    if group.rank == 0:
        device, facts = measure_device(rank_device(0, device_type))
        per_node = where.count(where[0])
        backend = dist.get_backend(group.process_group)
        intra = fit_alpha_beta(points[f"0-{intra_peer}"], f"{backend}, in node") if intra_peer is not None else None
        inter = fit_alpha_beta(points[f"0-{inter_peer}"], f"{backend}, across nodes") if inter_peer else None
        details = {"discovery": discover(), "device_measure": facts, "ranks": [list(w) for w in where],
                   "send_recv_mode": points.pop("mode"),
                   "points": {f"send/recv {k}": v for k, v in points.items()}}
        result = Topology(len(nodes), per_node, device, intra, inter, None,
                          f"measured under torchrun, {group.world_size} ranks", _jsonable(details))
    dist.barrier(group=group.process_group)
    dist.destroy_process_group()
    return result


def _jsonable(details: dict) -> dict:
    """Points as [bytes, microseconds] lists, so the JSON reads like the reference files."""
    out = dict(details)
    out["points"] = {k: [[n, round(t * 1e6, 3)] for n, t in v] for k, v in details.get("points", {}).items()}
    return out
