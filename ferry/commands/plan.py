"""`ferry topo` (this machine's devices and links, measured) and `ferry plan` (the TP x PP layout to run)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ferry.commands import DeviceOpt, VerboseOpt, app, err, run_guarded, setup_logging

JsonFileOpt = Annotated[Path | None, typer.Option(
    "--json", help="write the JSON here ('-': print it on stdout instead of the table)", show_default=False)]
PresetOpt = Annotated[str | None, typer.Option(
    help="a topology built from the reference measurements: h200x2-nvlink, h100x4-nvlink, h100x8-nodes4-ib400, "
    "h200x8-nodes2-ib400", show_default=False)]


def _console():
    from rich.console import Console

    # Piped or captured output has no terminal width: wide enough for the plan's columns unless COLUMNS says.
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(width=None if wide else 160, highlight=False)


def _write_json(doc: dict, path: Path) -> None:
    text = json.dumps(doc, indent=1)
    if str(path) == "-":
        print(text, flush=True)
    else:
        path.write_text(text + "\n")
        err(f"ferry: wrote {path}")


@app.command()
def topo(
    json_path: JsonFileOpt = None,
    sizes: Annotated[str | None, typer.Option(
        help="message sizes of the alpha-beta fits, e.g. 4K,64K,1M \\[default: 4K,64K,1M,4M on CPU; "
        "8K,256K,8M,64M on GPU]", show_default=False)] = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """This machine's devices and links, each link's latency (alpha) and bandwidth (beta) measured; under
    torchrun the links between ranks, inside a node and across nodes (rank 0 prints and writes)."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.comm.topology import parse_sizes
        from ferry.comm.topology import preset as preset_topology

        byte_sizes = parse_sizes(sizes) if sizes else None
        if preset:
            topology = preset_topology(preset)
        else:
            from ferry.comm.link_probe import measure_local, measure_torchrun
            from ferry.device import resolve_device
            from ferry.parallel.launch import under_torchrun

            kind = resolve_device(device).type
            if under_torchrun():
                topology = measure_torchrun(kind, byte_sizes)
                if topology is None:  # not rank 0
                    return
            else:
                topology = measure_local(kind, byte_sizes)
        if json_path is not None:
            _write_json(topology.to_json(), json_path)
        if json_path is None or str(json_path) != "-":
            _print_topology(topology)

    run_guarded(run)


def _print_topology(topology) -> None:
    from rich.table import Table

    console = _console()
    d = topology.device
    console.print(f"[bold]{topology.describe()}[/bold]: {d.memory_bytes / 2**30:.1f} GiB, "
                  f"{d.mem_bw_Bps / 1e9:.0f} GB/s memory, {d.flops / 1e12:.2f} TFLOP/s each")
    info = topology.details.get("discovery", {})
    if info:
        cpu = info["cpu"]
        console.print(f"host {info['hostname']}: {cpu['cores']} cores ({cpu['usable_cores']} usable), "
                      f"{cpu['numa_nodes']} NUMA node(s), {cpu['memory_bytes'] / 2**30:.1f} GiB; "
                      f"GPU links from {info['link_source']}")
    if info.get("gpus"):
        gpus = Table("GPU", "name", "memory GiB", "SMs", "NUMA", "PCI bus", title="devices")
        for g in info["gpus"]:
            gpus.add_row(str(g["index"]), g["name"], f"{g['memory_bytes'] / 2**30:.1f}", str(g["sm_count"]),
                         str(g["numa_node"]), str(g["pci_bus_id"]))
        console.print(gpus)
        pairs = Table("pair", "kind", title=f"GPU pairs ({info['link_source']})")
        for link in info["gpu_links"]:
            pairs.add_row(f"{link['a']}-{link['b']}", link["kind"])
        console.print(pairs)
    links = Table("link", "kind", "alpha us", "beta GB/s", "time of 4 KiB / 1 MiB / 64 MiB", title="links: time = "
                  "alpha + bytes / beta")
    for name in ("intra_node", "inter_node", "host_link"):
        link = getattr(topology, name)
        if link is not None:
            times = " / ".join(f"{link.seconds(n) * 1e6:.1f}" for n in (4 << 10, 1 << 20, 64 << 20))
            links.add_row(name, link.kind, f"{link.alpha_s * 1e6:.2f}", f"{link.beta_Bps / 1e9:.2f}", f"{times} us")
    for name, fit in topology.details.get("fits", {}).items():
        if name.startswith("copy"):  # the others are shown above as the links they became
            links.add_row(f"measured: {name}", "", f"{fit['alpha_us']:.2f}", f"{fit['beta_GBps']:.2f}", "")
    console.print(links)
    if "send_recv_mode" in topology.details:
        console.print(f"send/recv timed {topology.details['send_recv_mode']}")


@app.command()
def plan(
    topology: Annotated[str | None, typer.Option(
        help="a topology JSON file (`ferry topo --json`, or written by hand) or 'live': measure this machine "
        "\\[default: live]", show_default=False)] = None,
    preset: PresetOpt = None,
    model: Annotated[Path | None, typer.Option(
        "--model", "-m", help="GGUF file or HF checkpoint folder: its config is read, no weights",
        show_default=False)] = None,
    shape: Annotated[str | None, typer.Option(
        help="a known architecture instead of --model: llama3-8b, llama3-70b, tiny \\[default: llama3-8b]",
        show_default=False)] = None,
    batch: Annotated[int, typer.Option(help="sequences decoded together")] = 1,
    prompt: Annotated[int, typer.Option(help="prompt tokens per sequence")] = 512,
    output: Annotated[int, typer.Option(help="output tokens per sequence")] = 128,
    tp: Annotated[int | None, typer.Option("--tp", help="only layouts of this TP degree", show_default=False)] = None,
    pp: Annotated[int | None, typer.Option("--pp", help="only layouts of this many stages", show_default=False)] = None,
    micro_batches: Annotated[int | None, typer.Option(help="micro-batches in flight \\[default: pp]",
                                                      show_default=False)] = None,
    dtype: Annotated[str, typer.Option(help="weights, activations and KV cache: bf16, fp16 or fp32")] = "bf16",
    step_overhead_us: Annotated[float, typer.Option(help="fixed cost of each stage forward (launches, host)")] = 30.0,
    pipeline_host_us: Annotated[float | None, typer.Option(
        help="host work of a step that a pipeline's first stage cannot hide, per micro-batch \\[default: 500 on "
        "GPUs; on a CPU measured by --calibrate with --cpu-ranks 2 or more (a pipeline run on 2 ranks), else 0]",
        show_default=False)] = None,
    margin_gib: Annotated[float, typer.Option(help="memory kept free per device for activations and runtime")] = 2.0,
    cpu_ranks: Annotated[int, typer.Option(help="on a CPU: plan this many gloo ranks sharing its cores (what --tp "
                                           "and --pp start there), each a device with its share of them")] = 1,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="time Ferry's decode step on --device at two depths of the model's shape (1 and 3 "
        "layers on a CPU, 2 and 6 on a GPU) and use its layer and fixed parts instead of the roofline")] = False,
    device: DeviceOpt = None,
    top: Annotated[int, typer.Option(help="table rows at most (the JSON has every layout)")] = 20,
    json_path: JsonFileOpt = None,
    stages: Annotated[str | None, typer.Option(
        "--stages", help="plan a pipeline over these devices instead, e.g. cuda:0,cpu: every order and split, "
        "from each device's measured speed (cuda:0=24,cpu=8 keeps that order)", show_default=False)] = None,
    gpu_memory: Annotated[str | None, typer.Option(
        help="with --stages: the GPU memory the model may use (e.g. 12GiB); also predicts streaming the layers "
        "beyond it", show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show each layout's cost terms and log to "
                                          "stderr")] = False,
) -> None:
    """Predict prefill time, decode speed and memory per device of every TP x PP layout and recommend one; with
    --stages, of every order and layer split of a pipeline over devices of different kinds."""
    setup_logging(verbose)
    if stages is not None:
        run_guarded(lambda: _plan_stages(stages, gpu_memory, model, shape, batch, micro_batches, margin_gib, top,
                                         json_path))
        return
    if gpu_memory is not None:
        run_guarded(lambda: _refuse("--gpu-memory plans a GPU + host pipeline; give --stages too"))
        return

    def run() -> None:
        from dataclasses import replace

        from ferry.comm.topology import Topology
        from ferry.comm.topology import preset as preset_topology
        from ferry.errors import FerryError
        from ferry.parallel.cost_model import CostParams
        from ferry.parallel.planner import Workload, load_model_config
        from ferry.parallel.planner import plan as make_plan

        bytes_of = {"bf16": 2, "fp16": 2, "fp32": 4}
        if dtype not in bytes_of:
            raise FerryError(f"unknown --dtype {dtype!r} (choose bf16, fp16, fp32)")
        if topology is not None and preset is not None:
            raise FerryError("give --topology or --preset, not both")
        name, config = load_model_config(model, shape)
        from ferry.device import resolve_device

        on_gpu = (preset is not None or topology not in (None, "live")) or resolve_device(device).type != "cpu"
        host_us = pipeline_host_us if pipeline_host_us is not None else (500.0 if on_gpu else 0.0)
        params = CostParams(bytes_of[dtype], step_overhead_us * 1e-6, int(margin_gib * 2**30), host_us * 1e-6)
        work = Workload(batch, prompt, output)
        work.check(config)  # before any measuring
        if cpu_ranks < 1:
            raise FerryError(f"--cpu-ranks must be 1 or more, got {cpu_ranks}")
        calibration = _calibrate(config, device, dtype, cpu_ranks, batch, prompt) if calibrate else None
        if preset is not None:
            topo_ = preset_topology(preset)
        elif topology not in (None, "live"):
            topo_ = Topology.load(Path(topology))
        else:
            from ferry.comm.link_probe import measure_local

            err("ferry: measuring this machine (give --preset or --topology FILE to skip)")
            device_type = resolve_device(device).type
            if device_type == "cpu" and cpu_ranks > 1:
                topo_ = _as_cpu_ranks(measure_local("cpu"), cpu_ranks)
            else:
                topo_ = measure_local(device_type, for_planner=True)
        if calibrate and not on_gpu and cpu_ranks > 1 and pipeline_host_us is None:
            params = replace(params, pipeline_host_s=_time_pipeline_host(config, dtype, batch, prompt, calibration,
                                                                         topo_))
        result = make_plan(config, topo_, work, params, tp, pp, micro_batches, calibration, name)
        if json_path is not None:
            _write_json(result.to_json(), json_path)
        if json_path is None or str(json_path) != "-":
            _print_plan(result, top, verbose)

    run_guarded(run)


def _refuse(message: str) -> None:
    from ferry.errors import FerryError

    raise FerryError(message)


def _plan_stages(stages: str, gpu_memory, model, shape, batch: int, micro_batches, margin_gib: float, top: int,
                 json_path) -> None:
    """`ferry plan --stages`: measure each device kind of the placement (cached), predict every order and split."""
    import os

    import torch
    from rich.table import Table

    from ferry.device import resolve_dtype
    from ferry.errors import FerryError
    from ferry.parallel.device_speed import measure
    from ferry.parallel.offload_plan import KV_SHARE, choose, measure_h2d_bandwidth, parse_size
    from ferry.parallel.placement import parse_stages
    from ferry.parallel.placement_plan import plan_placed
    from ferry.parallel.planner import load_model_config

    if batch < 1:
        raise FerryError(f"--batch must be 1 or more, got {batch}")
    placement = parse_stages(stages)
    if placement.tp > 1:
        raise FerryError("ferry plan --stages plans one rank per stage; give devices, e.g. cuda:0,cpu")
    name, config = load_model_config(model, shape)
    devices = [s.ranks[0].device for s in placement.stages]
    speeds, dtype_bytes, limits = {}, {}, {}
    margin = margin_gib * 2**30
    for device in dict.fromkeys(devices):
        dev = torch.device(device)
        dtype = resolve_dtype(None, dev, tp=1 if placement.mixed else placement.world)  # as --stages resolves it
        # A CPU stage's rank gets its share of the cores beside the accelerator ranks (placement.py).
        threads = placement.threads(devices.index(device)) if dev.type == "cpu" else None
        err(f"ferry: measuring {device} ({dtype}, {threads or torch.get_num_threads()} threads; cached after the "
            "first run)")
        speeds[device] = measure(config, dev, dtype, threads=threads)
        dtype_bytes[device] = dtype.itemsize
        if dev.type == "cpu":
            limits[device] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") - margin
        else:
            total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else float("inf")
            # A budget keeps offload_plan's share of it for the KV cache, as --gpu-memory runs do.
            limits[device] = parse_size(gpu_memory) * (1 - KV_SHARE) if gpu_memory else total - margin
    gpu = next((d for d in devices if d.startswith("cuda")), None)
    h2d = measure_h2d_bandwidth(torch.device(gpu)) if gpu else None
    predictions = plan_placed(config, devices, speeds, dtype_bytes, limits, batch, micro_batches, h2d,
                              keep_order=not placement.measured_split)
    doc = {"model": name, "batch": batch, "speeds": {d: vars(s) for d, s in speeds.items()},
           "h2d_GBps": round(h2d / 1e9, 2) if h2d else None, "predictions": [p.to_json() for p in predictions]}
    if gpu and gpu_memory and "cpu" in devices:
        way = choose(config, dtype_bytes[gpu], parse_size(gpu_memory), batch, speeds[gpu], speeds["cpu"], h2d,
                     micro_batches or 2)
        doc["offload"] = way.to_json()
    if json_path is not None:
        _write_json(doc, json_path)
        if str(json_path) == "-":
            return
    console = _console()
    table = Table("", "--stages", "stage ms", "cycle ms", "decode tok/s", "GiB per stage", "fits",
                  title=f"{name}, batch {batch}: pipelines over {', '.join(dict.fromkeys(devices))}, fastest first")
    best = predictions[0] if predictions and predictions[0].fits else None
    for p in predictions[:top]:
        table.add_row("*" if p is best else "", p.stages, " / ".join(f"{t:.2f}" for t in p.stage_ms),
                      f"{p.cycle_ms:.2f}", f"{p.decode_tok_s:.1f}", " / ".join(f"{m:.1f}" for m in p.memory_gib),
                      "yes" if p.fits else "no", style="bold" if p is best else (None if p.fits else "dim"))
    console.print(table)
    if "offload" in doc:
        o = doc["offload"]
        err(f"ferry: with --gpu-memory {gpu_memory}: {o['why']} -> {o['way']}")
    if best is None:
        err("ferry: no order and split fits the devices' memory")
    else:
        err(f"ferry: recommended --stages {best.stages}: {best.decode_tok_s:.1f} tokens/s decode at batch {batch}")


def _calibrate(config, device, dtype, cpu_ranks: int = 1, batch: int = 1, prompt: int = 32):
    """The engine's step timed at the rows a decode micro-batch of this workload has (1 to 8 micro-batches),
    each sequence with the workload's prompt."""
    import math
    import os

    import torch

    from ferry.device import DTYPES, resolve_device
    from ferry.parallel.cost_model import time_engine_steps

    dev = resolve_device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu" and cpu_ranks > 1:  # one rank's share of the cores, as the launcher gives each rank
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cpu_ranks))
    err(f"ferry: timing Ferry's decode step at two depths on {dev} ({torch.get_num_threads()} threads) "
        "for --calibrate")
    try:
        rows = sorted({1} | {math.ceil(batch / m) for m in (1, 2, 3, 4, 8)})
        return time_engine_steps(config, dev, DTYPES[dtype], token_counts=tuple(rows), repeats=5, prompt_len=prompt)
    finally:
        torch.set_num_threads(threads)


def _time_pipeline_host(config, dtype: str, batch: int, prompt: int, calibration, topo) -> float:
    """CostParams.pipeline_host_s measured on this CPU's ranks (cost_model.time_pipeline_host) at the workload's
    batch."""
    from ferry.device import DTYPES
    from ferry.parallel.cost_model import time_pipeline_host

    err(f"ferry: timing Ferry's pipeline engine on 2 CPU ranks (batch {batch}) for --calibrate")
    host_s, run = time_pipeline_host(config, str(DTYPES[dtype]).removeprefix("torch."), batch, prompt, calibration,
                                     topo)
    err(f"ferry: a pipeline micro-batch's own cost: {host_s * 1e6:.0f} us (measured cycle "
        f"{run['measured_cycle_s'] * 1e3:.2f} ms, modelled without it {run['modelled_cycle_s'] * 1e3:.2f} ms)")
    return host_s


def _as_cpu_ranks(topo, ranks: int):
    """This CPU as `ranks` planning devices: gloo processes that split its cores, memory bandwidth and memory, and
    talk over the measured process-to-process link."""
    from dataclasses import replace

    device = topo.device
    share = replace(device, name=f"{device.name} / {ranks} ranks", memory_bytes=device.memory_bytes // ranks,
                    mem_bw_Bps=device.mem_bw_Bps / ranks, flops=device.flops / ranks)
    return replace(topo, devices_per_node=ranks, device=share, details={**topo.details, "cpu_ranks": ranks})


def _print_plan(result, top: int, verbose: bool) -> None:
    from rich.table import Table

    console = _console()
    c, w = result.config, result.workload
    console.print(f"[bold]{result.model_name}[/bold] ({c.num_params / 1e9:.2f} B parameters, {c.num_layers} layers) "
                  f"on {result.topology.describe()}; batch {w.batch}, prompt {w.prompt}, output {w.output}"
                  + (f"; compute calibrated on {result.calibration.device} ({result.calibration.mode})"
                     if result.calibration else ""))
    shown = result.predictions[:top]
    table = Table("", "layout", "split", "M", "TP link", "PP links", "GiB/device", "fits", "prefill ms", "ms/token",
                  "decode tok/s", title="layouts, fastest decode first")
    for p in shown:
        lay = p.layout
        table.add_row("*" if p is result.recommended else "", lay.name, _split(lay), str(lay.micro_batches),
                      p.tp_link or "-", ", ".join(sorted(set(p.pp_links))) or "-", f"{p.memory_bytes / 2**30:.1f}",
                      "yes" if p.fits else f"no (> {p.memory_limit / 2**30:.0f})", f"{p.prefill_s * 1e3:.2f}",
                      f"{p.tpot_s * 1e3:.3f}", f"{p.decode_tok_s:.1f}",
                      style="bold" if p is result.recommended else ("dim" if not p.fits else None))
    console.print(table)
    if verbose:  # where a token's time goes: the slowest stage's decode terms for one micro-batch
        terms = Table("layout", "split", "compute", "KV read", "TP all-reduce", "PP send", "LM head + embed",
                      "launch + host", "stage us", "cycle", title="decode terms of the slowest stage, one micro-batch (us); "
                      "cycle = ms per token as a multiple of that stage")
        for p in shown:
            s = p.bottleneck
            terms.add_row(p.layout.name, _split(p.layout), *(f"{s[k] * 1e6:.0f}" for k in (
                "compute", "kv_read", "tp_allreduce", "pp_send")), f"{(s['lm_head'] + s['embed']) * 1e6:.0f}",
                f"{(s['overhead'] + s.get('pipeline_host', 0.0) + s.get('host_wait', 0.0)) * 1e6:.0f}",
                f"{s['busy'] * 1e6:.0f}", f"{p.tpot_s / s['busy']:.2f} x")
        console.print(terms)
    hidden = len(result.predictions) - len(shown)
    if hidden:
        console.print(f"{hidden} more layouts in --json (or raise --top)")
    best = result.recommended
    if best is None:
        err("ferry: no layout fits: every one needs more memory per device than the topology has")
        return
    err(f"ferry: recommended {best.layout.name} (split {'/'.join(map(str, best.layout.split))}, "
        f"{best.layout.micro_batches} micro-batches): {best.decode_tok_s:.1f} tokens/s decode, "
        f"{best.tpot_s * 1e3:.2f} ms per token, prefill {best.prefill_s * 1e3:.1f} ms, "
        f"{best.memory_bytes / 2**30:.1f} GiB per device")


def _split(layout) -> str:
    return "even" if len(set(layout.split)) == 1 else "/".join(map(str, layout.split))
