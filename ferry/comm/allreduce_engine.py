"""The all-reduce engine: per message size, the path that measured fastest on this machine.

Calibration times every available path (ferry/comm/allreduce_paths.py) at sizes 8 KiB..64 MiB, inside a CUDA
graph on GPUs (decode runs in graphs) and eagerly elsewhere. Each rank's times are max-reduced before choosing,
so every rank picks the same path for the same message (ranks that disagreed would deadlock). The table is
cached per machine fingerprint (device name, ranks, torch and NCCL versions, dtype) and logged; rank 0 owns the
cache and broadcasts it, so multi-node groups agree too.

A decoder layer adds each all-reduced sum to its residual stream and normalises the result for the next matmul.
For those sums a second table says, per size up to 1 MiB, whether the one-kernel all-reduce + add + RMSNorm
(ferry_fused_norm, fused_norm_kernel.py) or the size table's path followed by one add+RMSNorm kernel was faster,
timed the same way; `--allreduce auto,fused` / `auto,unfused` force it on or off.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ferry.cache import cache_root
from ferry.comm.allreduce_paths import (
    LamportFusedNormPath,
    ProcessGroupPath,
    available_paths,
    fused_norm_path,
)
from ferry.comm.host_shm import HostSharedMemoryPath
from ferry.model.layers import fused as fused_ops

log = logging.getLogger("ferry.allreduce")

CALIBRATION_SIZES = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 2 << 20, 8 << 20, 32 << 20, 64 << 20]
# The fused all-reduce + add + RMSNorm: messages up to FUSION_MAX_BYTES (batch 128 of a 4096-wide model in bf16)
# are timed fused and unfused, rows of FUSION_WIDTH columns (decode's hidden states: the time is per launch and
# per byte, not per width).
FUSION_SIZES = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 1 << 20]
FUSION_MAX_BYTES = max(FUSION_SIZES)
FUSION_WIDTH = 4096
FUSION_MODES = ("auto", "fused", "unfused")


def parse_mode(mode: str) -> tuple[str, str]:
    """`--allreduce PATH[,fused|,unfused]` -> (plain path or "auto", fusion mode). Forcing a plain path leaves
    the fusion off unless asked for: a forced path is a comparison, and it should be that path alone."""
    plain, _, fusion = mode.partition(",")
    fusion = fusion or ("auto" if plain == "auto" else "unfused")
    if fusion not in FUSION_MODES:
        from ferry.errors import FerryError

        raise FerryError(f"--allreduce {mode!r}: after the comma give fused or unfused (the all-reduce + residual "
                         f"add + RMSNorm kernel forced on or off), not {fusion!r}")
    return plain, fusion


@dataclass(frozen=True)
class SizeChoice:
    max_bytes: int  # messages up to this size (and above the previous row's) use `path`
    path: str
    times_us: dict[str, float]  # every path measured at this size (max over ranks)


def choose(times_by_size: dict[int, dict[str, float]]) -> list[SizeChoice]:
    """The fastest path per size; ties go to the process group (the path every setup has)."""
    rows = []
    for size in sorted(times_by_size):
        times = times_by_size[size]
        best = min(times, key=lambda name: (times[name], name != ProcessGroupPath.name))
        rows.append(SizeChoice(size, best, dict(times)))
    return rows


def fingerprint(device: torch.device, world_size: int, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else "none"
    # "fusion1": the cache holds the add + RMSNorm fusion table too (older files lack it: calibrate again)
    return f"{name}|w{world_size}|torch{torch.__version__}|nccl{nccl}|{str(dtype).removeprefix('torch.')}|fusion1"


def cache_dir() -> Path:
    return cache_root() / "allreduce"


@dataclass(frozen=True)
class FusionChoice:
    max_bytes: int  # sums of this size (and above the previous row's) that feed an add + RMSNorm
    fused: bool  # True: the one-kernel path; False: the size table's path, then one add+RMSNorm kernel
    times_us: dict[str, float]  # "fused" and "unfused", max over ranks


class AllReduceEngine:
    """Holds the available paths and the size table; `reduce(tensor)` sends each message down its chosen path,
    `reduce_add_norm` the sums a decoder layer adds to its residual stream (fused with the add and the norm
    where the fusion table says so)."""

    def __init__(self, paths: list, table: list[SizeChoice], skipped: dict[str, str] | None = None,
                 fused=None, fusion: list[FusionChoice] | str = "unfused") -> None:
        """`fusion`: the calibrated table, or "fused" / "unfused" for every size the fused path takes."""
        self.paths = {p.name: p for p in paths}
        self.table = table
        self.skipped = skipped or {}
        self.fallback = self.paths[ProcessGroupPath.name]
        self.fused = fused
        self.fusion = fusion if fused is not None else "unfused"
        # Which path ran, for --verbose and benches: eager calls and CUDA-graph captures (a replay is not a call).
        self.calls: dict[str, int] = {name: 0 for name in self.paths}
        if fused is not None:
            self.calls[fused.name] = 0
        self._side: torch.cuda.Stream | None = None  # where asynchronous symmetric-memory sums run

    @classmethod
    def for_group(cls, mode: str, process_group: dist.ProcessGroup | None, device: torch.device,
                  dtype: torch.dtype) -> AllReduceEngine:
        """`mode`: "auto" (calibrated tables) or one path's name for every message (benchmarks, comparisons),
        either followed by ",fused" or ",unfused" to force the all-reduce + add + RMSNorm kernel on or off."""
        plain, fusion = parse_mode(mode)
        if plain == "auto":
            return cls.calibrated(process_group, device, dtype, fusion=fusion)
        paths, skipped = available_paths(process_group, device, dtype, max(CALIBRATION_SIZES))
        fused = _fused_path(fusion, process_group, device, dtype, skipped)
        names = [p.name for p in paths]
        if plain not in names:
            from ferry.errors import FerryError

            why = f": {skipped[plain]}" if plain in skipped else ""
            raise FerryError(f"--allreduce {plain!r} cannot run here{why} (available: auto, {', '.join(names)})")
        log.info("all-reduce: every message takes %s (forced); all-reduce + add + RMSNorm %s", plain, fusion)
        return cls(paths, [SizeChoice(max(CALIBRATION_SIZES), plain, {})], skipped, fused, fusion)

    @classmethod
    def calibrated(cls, process_group: dist.ProcessGroup | None, device: torch.device, dtype: torch.dtype,
                   sizes: list[int] | None = None, use_cache: bool = True, fusion: str = "auto") -> AllReduceEngine:
        sizes = sizes or CALIBRATION_SIZES
        paths, skipped = available_paths(process_group, device, dtype, max(sizes))
        fused = _fused_path(fusion, process_group, device, dtype, skipped)
        shm = next((p for p in paths if p.name == HostSharedMemoryPath.name), None)
        if shm is not None:
            # CPU ranks of one host: a copy into shared memory and a local sum beat gloo's loopback TCP at every
            # size a slot holds (benchmarks/results/*_allreduce_cpu*), so nothing is timed at start.
            table = [SizeChoice(shm.max_bytes, shm.name, {})]
            log.info("all-reduce: host shared memory up to %s, %s above", _human(shm.max_bytes), paths[0].label)
            return cls(paths, table, skipped)
        if len(paths) == 1 and fused is None:
            table = [SizeChoice(max(sizes), ProcessGroupPath.name, {})]
            log.info("all-reduce: only %s is available here; no calibration needed", paths[0].label)
            return cls(paths, table, skipped)
        key = fingerprint(device, dist.get_world_size(process_group), dtype)
        file = cache_dir() / (key.replace("|", "_").replace(" ", "-").replace("/", "-") + ".json")
        cached = _load_cached(file, key, process_group) if use_cache else None
        measured = cached is None
        if measured:
            times = {size: measure_in_graph_or_eager(paths, size, dtype, device, process_group) for size in sizes}
            table, fusion_table = choose(times), []
        else:
            table, fusion_table = cached
        if fused is not None and not fusion_table:  # not timed yet, or cached by a run that had the fusion off
            fusion_table = choose_fusion({size: measure_fusion(fused, cls(paths, table), size, dtype, device,
                                                               process_group) for size in FUSION_SIZES})
            measured = True
        if measured and use_cache and dist.get_rank(process_group) == 0:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps({"fingerprint": key, "table": [asdict(r) for r in table],
                                        "fusion": [asdict(r) for r in fusion_table]}, indent=1))
        engine = cls(paths, table, skipped, fused, fusion_table if fusion == "auto" else fusion)
        log.info("all-reduce plan (%s):\n%s", key, engine.describe())
        return engine

    def path_for(self, nbytes: int):
        for row in self.table:
            if nbytes <= row.max_bytes:
                return self.paths[row.path]
        return self.fallback  # larger than any calibrated size

    def _route(self, tensor: torch.Tensor):
        path = self.path_for(tensor.numel() * tensor.element_size())
        if path is not self.fallback and not path.fits(tensor):
            path = self.fallback  # other dtype than calibrated: counted, so it shows in `calls`
        self.calls[path.name] += 1
        return path

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._route(tensor).reduce(tensor)

    def fuses(self, nbytes: int) -> bool:
        """Whether a sum of `nbytes` feeding an add + RMSNorm takes the fused kernel."""
        if self.fused is None or nbytes > self.fused.max_bytes or self.fusion == "unfused":
            return False
        if self.fusion == "fused":
            return True
        return next((row.fused for row in self.fusion if nbytes <= row.max_bytes), False)

    def reduce_add_norm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                        eps: float) -> torch.Tensor | None:
        """residual += sum over ranks of `partial`; returns weight * rmsnorm(residual) (None without a weight)."""
        # Inside torch.compile the sum stays on the traced paths: the kernel's pointer tables are not traceable.
        if (self.fuses(partial.numel() * partial.element_size()) and self.fused.fits(partial, residual)
                and not torch.compiler.is_compiling()):
            self.calls[self.fused.name] += 1
            return self.fused.reduce_add_norm(partial, residual, weight, eps)
        return fused_ops.add_rmsnorm(self.reduce(partial), residual, weight, eps)

    def reduce_async(self, tensor: torch.Tensor):
        """Start the sum of `tensor` on the path its size takes; `.wait()` on the result returns it.

        The process group runs asynchronously by itself (NCCL's own stream; gloo's thread). The symmetric-memory
        paths are stream-ordered kernels, so they run on one side stream of the engine's: work the caller issues
        before `wait()` overlaps them, and calls queued there run in order, so they never share the buffer."""
        path = self._route(tensor)
        if isinstance(path, ProcessGroupPath):
            return PendingSum(tensor, dist.all_reduce(tensor, group=path.process_group, async_op=True))
        if tensor.device.type == "cpu":  # host shared memory: the sum is done when reduce returns
            return PendingSum(path.reduce(tensor), None)
        if self._side is None:
            self._side = torch.cuda.Stream(tensor.device)
        current = torch.cuda.current_stream(tensor.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            out = path.reduce(tensor)
            done = torch.cuda.Event()
            done.record(self._side)
        tensor.record_stream(self._side)
        return PendingSum(out, _StreamWait(done, current))

    def describe(self) -> str:
        lines = [_plan_line("size", "path", "times (us)")]
        lines += [_plan_line(_human(row.max_bytes), row.path, row.times_us) for row in self.table]
        if self.fused is not None:
            if isinstance(self.fusion, str):
                lines.append(f"all-reduce + add + RMSNorm: {self.fusion} (forced) up to {_human(self.fused.max_bytes)}")
            else:
                lines.append(_plan_line("size", "add+RMSNorm", "times (us)"))
                lines += [_plan_line(_human(row.max_bytes), "fused" if row.fused else "unfused", row.times_us)
                          for row in self.fusion]
        lines += [f"  {name}: not available ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class PendingSum:
    """A sum in flight: `wait()` returns the summed tensor once the current stream may use it."""

    tensor: torch.Tensor
    work: object | None  # dist.Work, a _StreamWait, or None (nothing was in flight)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.tensor


@dataclass
class _StreamWait:
    done: torch.cuda.Event
    stream: torch.cuda.Stream

    def wait(self) -> None:
        self.stream.wait_event(self.done)  # orders the consumer's stream after the sum; the host never blocks


def _fused_path(fusion: str, process_group, device: torch.device, dtype: torch.dtype, skipped: dict[str, str]):
    """The fused all-reduce + add + RMSNorm path unless refused; forcing it where it cannot run is an error."""
    if fusion == "unfused":
        return None
    path, reason = fused_norm_path(process_group, device, dtype, FUSION_MAX_BYTES)
    if path is None:
        skipped[LamportFusedNormPath.name] = reason
        if fusion == "fused":
            from ferry.errors import FerryError

            raise FerryError(f"--allreduce ...,fused: the all-reduce + add + RMSNorm kernel cannot run here: {reason}")
    return path


def choose_fusion(times_by_size: dict[int, dict[str, float]]) -> list[FusionChoice]:
    """Fused where it measured faster; ties stay unfused (the path with fewer moving parts)."""
    return [FusionChoice(size, times["fused"] < times["unfused"], dict(times))
            for size, times in sorted(times_by_size.items())]


def measure_fusion(fused, plain: AllReduceEngine, nbytes: int, dtype: torch.dtype, device: torch.device,
                   process_group, repeats: int = 20, trials: int = 5) -> dict[str, float]:
    """Microseconds per sum + add + RMSNorm of `nbytes` (rows of FUSION_WIDTH), fused and unfused (`plain`, an
    engine without the fusion: its table's path, then the add+RMSNorm kernel), in a CUDA graph; max over ranks."""
    rows = max(1, nbytes // (FUSION_WIDTH * dtype.itemsize))
    partial = torch.full((rows, FUSION_WIDTH), 0.01, dtype=dtype, device=device)
    residual = torch.zeros_like(partial)
    weight = torch.ones(FUSION_WIDTH, dtype=dtype, device=device)
    times = {
        "fused": time_fn_in_graph(lambda: fused.reduce_add_norm(partial, residual, weight, 1e-5), repeats, trials),
        "unfused": time_fn_in_graph(lambda: plain.reduce_add_norm(partial, residual, weight, 1e-5), repeats, trials),
    }
    local = torch.tensor([times["fused"], times["unfused"]], dtype=torch.float64, device=device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=process_group)
    return {"fused": round(float(local[0]), 2), "unfused": round(float(local[1]), 2)}


def _load_cached(file: Path, key: str, process_group) -> tuple[list[SizeChoice], list[FusionChoice]] | None:
    """Rank 0's cached tables, broadcast so every rank (on every node) uses the same ones; None: calibrate."""
    found: list = [None]
    if dist.get_rank(process_group) == 0 and file.exists():
        try:
            doc = json.loads(file.read_text())
            if doc.get("fingerprint") == key:
                found = [(doc["table"], doc.get("fusion", []))]  # no fusion rows: timed at start if it can run
        except (OSError, ValueError, KeyError):
            log.warning("ignoring an unreadable all-reduce cache %s", file)
    dist.broadcast_object_list(found, src=dist.get_global_rank(process_group, 0) if process_group else 0,
                               group=process_group)
    if found[0] is None:
        return None
    log.info("all-reduce plan from cache %s", file)
    table, fusion = found[0]
    return [SizeChoice(**row) for row in table], [FusionChoice(**row) for row in fusion]


def measure_in_graph_or_eager(paths: list, nbytes: int, dtype: torch.dtype, device: torch.device,
                              process_group, repeats: int = 20, trials: int = 5) -> dict[str, float]:
    """Microseconds per all-reduce of `nbytes` for each path, max over ranks (the slowest rank sets the pace)."""
    numel = nbytes // dtype.itemsize
    times = {}
    for path in paths:
        x = torch.ones(numel, dtype=dtype, device=device)
        if device.type == "cuda":
            times[path.name] = time_in_graph(path, x, repeats, trials)
        else:
            times[path.name] = time_eager(path, x, repeats, trials, process_group)
    names = sorted(times)
    local = torch.tensor([times[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=process_group)
    return {n: round(float(t), 2) for n, t in zip(names, local.tolist(), strict=True)}


def time_eager(path, x: torch.Tensor, repeats: int, trials: int, process_group) -> float:
    import time

    path.reduce(x)  # warm-up (connection set-up)
    samples = []
    for _ in range(trials):
        dist.barrier(group=process_group)
        started = time.perf_counter()
        for _ in range(repeats):
            path.reduce(x)
        samples.append((time.perf_counter() - started) / repeats * 1e6)
    return statistics.median(samples)


def time_in_graph(path, x: torch.Tensor, repeats: int, trials: int) -> float:
    return time_fn_in_graph(lambda: path.reduce(x), repeats, trials)


def time_fn_in_graph(fn, repeats: int, trials: int) -> float:
    """Microseconds per call of `fn` (GPU work only), `repeats` calls captured in one CUDA graph, median of
    `trials` replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # warm-up outside capture (NCCL communicator set-up, symm-mem handshakes, Triton compiles)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / repeats)
    return statistics.median(samples)


def _plan_line(size: str, choice: str, times: dict[str, float] | str) -> str:
    if isinstance(times, dict):
        times = ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items()))
    return f"{size:>10}  {choice:<14}  {times}"


def _human(nbytes: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):g} {unit}"
    return f"{nbytes} B"
