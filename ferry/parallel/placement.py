"""Where each rank of a pipeline runs: stages on devices of different kinds and speeds (`--stages`).

A placement lists the pipeline's stages in order; each stage is one or more tensor-parallel ranks on devices of
one kind, with its layer count (or none: sized by measured speed, device_speed.py) and, for tensor parallelism
over ranks of unequal speed, each rank's share of the heads and FFN columns. Short form, one rank per stage:

    --stages cuda:0=24,cpu=6        24 layers on the GPU, 6 on the host
    --stages cuda:0,cpu             layer counts from each device's measured time per layer

JSON form (a file), for tensor-parallel stages, CPU thread counts and emulated slow devices:

    {"stages": [{"layers": 20, "ranks": [{"device": "cpu", "threads": 1}], "dtype": "bf16"},
                {"ranks": [{"device": "cpu", "threads": 1, "slowdown": 2}, {"device": "cpu"}], "shares": "auto"}]}

`slowdown` k runs every matmul of that rank k times: a device k times slower, to test and measure uneven splits
on one host (a CPU's cores are all alike). Ranks are numbered stage by stage (mesh.py's layout), so stage s holds
ranks [s tp, (s + 1) tp); every stage has the same number of ranks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ferry.device import BACKENDS, DTYPES, present_devices
from ferry.errors import FerryError


@dataclass(frozen=True)
class RankPlace:
    device: str  # "cpu", "cuda:0", "xpu:1"
    threads: int | None = None  # CPU threads of this rank's torch; None: its share of the host's cores
    slowdown: int = 1  # emulate a device this many times slower at matmuls (tests and benchmarks)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def indexed(self) -> str:
        """The device as ranks set it: an accelerator with its index (cuda -> cuda:0)."""
        return self.device if self.device_type == "cpu" or ":" in self.device else f"{self.device}:0"


@dataclass(frozen=True)
class StagePlace:
    ranks: tuple[RankPlace, ...]
    layers: int | None = None  # None: sized by measured speed
    shares: tuple[float, ...] | str | None = None  # TP work per rank: None even, "auto" measured, or weights
    dtype: str | None = None  # this stage's dtype (fp32, bf16, ...); None: --dtype, or its device's default

    @property
    def device_type(self) -> str:
        return self.ranks[0].device_type


@dataclass(frozen=True)
class Placement:
    stages: tuple[StagePlace, ...]

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def tp(self) -> int:
        return len(self.stages[0].ranks)

    @property
    def world(self) -> int:
        return self.pp * self.tp

    def rank(self, r: int) -> RankPlace:
        return self.stages[r // self.tp].ranks[r % self.tp]

    @property
    def device_types(self) -> list[str]:
        return sorted({s.device_type for s in self.stages})

    @property
    def mixed(self) -> bool:
        return len(self.device_types) > 1

    @property
    def world_backend(self) -> str:
        """The world group's backend: the devices' own when all stages share a kind, else gloo (host tensors);
        accelerator ranks of a mixed placement then talk over groups of their own backend (pipeline_stage.py)."""
        return BACKENDS[self.device_types[0]] if not self.mixed else "gloo"

    @property
    def layer_split(self) -> str | None:
        """"10,10,12" when every stage's count is given; None when they are to be measured."""
        if any(s.layers is None for s in self.stages):
            return None
        return ",".join(str(s.layers) for s in self.stages)

    @property
    def measured_split(self) -> bool:
        return self.pp > 1 and self.layer_split is None

    def threads(self, r: int) -> int:
        """CPU threads of rank r: as placed, else accelerator ranks 1 (they only launch work) and CPU ranks an
        equal share of the cores the accelerator ranks leave, two cores each: a GPU stage's host thread starved
        by a busy CPU stage launches its graphs late (on the H200 machine, 8 layers' replay took 9 ms of GPU time
        instead of 2 with the other 31 cores all computing)."""
        place = self.rank(r)
        if place.threads is not None:
            return place.threads
        if place.device_type != "cpu":
            return 1
        cpu_ranks = sum(1 for i in range(self.world) if self.rank(i).device_type == "cpu")
        accelerator_ranks = self.world - cpu_ranks
        return max(1, ((os.cpu_count() or 1) - 2 * accelerator_ranks) // cpu_ranks)

    def __str__(self) -> str:
        return " | ".join("+".join(r.device for r in s.ranks) + (f"={s.layers}" if s.layers else "")
                          for s in self.stages)


def parse_stages(text: str) -> Placement:
    """`--stages`: a JSON file's path, or the short form `dev[=layers],dev[=layers],...`."""
    if text.endswith(".json") or Path(text).is_file():
        path = Path(text).expanduser()
        try:
            doc = json.loads(path.read_text())
        except OSError as exc:
            raise FerryError(f"--stages {text}: cannot read the placement file ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise FerryError(f"--stages {text}: not valid JSON ({exc})") from None
        return placement_from_json(doc, text)
    stages = []
    for entry in text.split(","):
        device, _, layers = entry.strip().partition("=")
        if not device:
            raise FerryError(f"--stages {text!r}: an empty stage; write e.g. cuda:0=24,cpu=6")
        stages.append(StagePlace((RankPlace(device),), _count(layers, text) if layers else None))
    return check_placement(Placement(tuple(stages)), text)


def placement_from_json(doc, where: str) -> Placement:
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list) or not doc["stages"]:
        raise FerryError(f"--stages {where}: expected {{\"stages\": [{{\"ranks\": [{{\"device\": ...}}]}}, ...]}}")
    stages = []
    for i, stage in enumerate(doc["stages"]):
        ranks = stage.get("ranks") if isinstance(stage, dict) else None
        if not isinstance(ranks, list) or not ranks:
            raise FerryError(f"--stages {where}: stage {i} has no \"ranks\" list")
        places = []
        for rank in ranks:
            if not isinstance(rank, dict) or not isinstance(rank.get("device"), str):
                raise FerryError(f"--stages {where}: stage {i}: every rank needs a \"device\" string")
            unknown = set(rank) - {"device", "threads", "slowdown"}
            if unknown:
                raise FerryError(f"--stages {where}: stage {i}: unknown rank field(s) {', '.join(sorted(unknown))}")
            threads, slowdown = rank.get("threads"), rank.get("slowdown", 1)
            if threads is not None and (not isinstance(threads, int) or threads < 1):
                raise FerryError(f"--stages {where}: stage {i}: threads must be a whole number >= 1, got {threads!r}")
            if not isinstance(slowdown, int) or slowdown < 1:
                raise FerryError(f"--stages {where}: stage {i}: slowdown must be a whole number >= 1, got {slowdown!r}")
            places.append(RankPlace(rank["device"], threads, slowdown))
        layers = stage.get("layers")
        if layers is not None and (not isinstance(layers, int) or layers < 1):
            raise FerryError(f"--stages {where}: stage {i}: layers must be a whole number >= 1, got {layers!r}")
        unknown = set(stage) - {"ranks", "layers", "shares", "dtype"}
        if unknown:
            raise FerryError(f"--stages {where}: stage {i}: unknown field(s) {', '.join(sorted(unknown))}")
        dtype = stage.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise FerryError(f"--stages {where}: stage {i}: unknown dtype {dtype!r} (choose from "
                             f"{', '.join(sorted(DTYPES))})")
        stages.append(StagePlace(tuple(places), layers, parse_shares(stage.get("shares"), len(places), where),
                                 dtype))
    return check_placement(Placement(tuple(stages)), where)


def parse_shares(value, ranks: int, where: str) -> tuple[float, ...] | str | None:
    """A stage's TP shares: None (even), "auto" (measured) or one positive weight per rank ("2,1" or [2, 1])."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError:
            raise FerryError(f"{where}: shares {value!r}: give 'auto' or one weight per rank, e.g. 2,1") from None
    if not isinstance(value, list | tuple) or len(value) != ranks or not all(
            isinstance(v, int | float) and v > 0 for v in value):
        raise FerryError(f"{where}: shares {value!r}: give 'auto' or one positive weight per rank ({ranks} ranks)")
    return tuple(float(v) for v in value)


def _count(layers: str, text: str) -> int:
    try:
        count = int(layers)
    except ValueError:
        count = 0
    if count < 1:
        raise FerryError(f"--stages {text!r}: {layers!r} is not a layer count (a whole number >= 1)")
    return count


def check_placement(placement: Placement, where: str) -> Placement:
    """Refuse by name what cannot run: absent devices, an accelerator shared by two ranks, stages of different
    tensor-parallel degree or of mixed device kinds, layer counts given for some stages only."""
    present = present_devices()
    seen: set[str] = set()
    for s, stage in enumerate(placement.stages):
        if len(stage.ranks) != placement.tp:
            raise FerryError(f"--stages {where}: stage {s} has {len(stage.ranks)} ranks and stage 0 {placement.tp}; "
                             "every stage needs the same tensor-parallel degree")
        if len({r.device_type for r in stage.ranks}) > 1:
            raise FerryError(f"--stages {where}: stage {s} mixes {', '.join(r.device for r in stage.ranks)}; a "
                             "tensor-parallel stage's ranks must be devices of one kind (put others in their own stage)")
        for rank in stage.ranks:
            name = rank.indexed
            if rank.device_type not in BACKENDS:
                raise FerryError(f"--stages {where}: unknown device {rank.device!r} (known kinds: "
                                 f"{', '.join(BACKENDS)}; present here: {', '.join(present)})")
            if name not in present:
                raise FerryError(f"--stages {where}: device {rank.device!r} is not present; this machine has "
                                 f"{', '.join(present)}")
            if rank.device_type != "cpu":
                if name in seen:
                    raise FerryError(f"--stages {where}: {name} holds two ranks; give each accelerator one rank")
                seen.add(name)
    given = [s.layers is not None for s in placement.stages]
    if any(given) and not all(given):
        raise FerryError(f"--stages {where}: give every stage a layer count, or none (then measured speed sizes "
                         "them)")
    if placement.pp < 2 and placement.tp < 2:
        raise FerryError(f"--stages {where}: one rank needs no placement; use --device")
    return _with_indices(placement)


def _with_indices(placement: Placement) -> Placement:
    """Accelerator devices spelled with their index (cuda -> cuda:0), as ranks set them."""
    return Placement(tuple(replace(s, ranks=tuple(replace(r, device=r.indexed) for r in s.ranks))
                           for s in placement.stages))


def placement_from_options(stages: str | None, tp_shares: str | None, device: str | None, tp: int | None,
                           pp: int | None, layer_split: str | None) -> Placement | None:
    """The placement `--stages` or `--tp-shares` asks for (None: neither, every rank alike). `--stages` places
    every rank itself, so the flags it replaces are refused beside it; `--tp-shares` weights the ranks of one
    tensor-parallel group on --device's kind."""
    if stages is None and tp_shares is None:
        return None
    if stages is not None:
        for flag, given in (("--tp", tp), ("--pp", pp), ("--layer-split", layer_split), ("--tp-shares", tp_shares),
                            ("--device", device)):
            if given is not None:
                raise FerryError(f"--stages places every rank itself; drop {flag} (a placement file's stages take "
                                 "\"shares\" for tensor-parallel ranks)")
        return parse_stages(stages)
    if (tp or 1) < 2:
        raise FerryError("--tp-shares weights tensor-parallel ranks; it needs --tp 2 or more")
    if (pp or 1) > 1:
        raise FerryError("--tp-shares weights one tensor-parallel group; for weighted stages of a pipeline give "
                         "--stages a placement file with \"shares\" per stage")
    from ferry.device import resolve_device

    kind = resolve_device(device).type
    ranks = tuple(RankPlace("cpu" if kind == "cpu" else f"{kind}:{r}") for r in range(tp))
    placement = Placement((StagePlace(ranks, None, parse_shares(tp_shares, tp, "--tp-shares")),))
    return check_placement(placement, f"--tp {tp} --tp-shares {tp_shares}")


def check_fits(placement: Placement, config) -> None:
    """The placement fits the model: layer counts add up, every stage has a layer, heads cover the TP ranks."""
    from ferry.parallel.layout import check_tensor_parallel, stage_spans

    check_tensor_parallel(config, placement.tp)
    if placement.pp > config.num_layers:
        raise FerryError(f"--stages has {placement.pp} stages; the model has {config.num_layers} layers")
    if placement.pp > 1 and placement.layer_split:
        stage_spans(config.num_layers, placement.pp, placement.layer_split)
