"""`ferry generate` and `ferry chat`: local generation on one device."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Annotated, Optional

import typer

from ferry.commands import (
    AllReduceOpt,
    ChatOpt,
    CompileModeOpt,
    CompileOpt,
    CompressedAllReduceOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    KvMemoryOpt,
    LayerSplitOpt,
    MaxTokensOpt,
    MicroBatchesOpt,
    ModelOpt,
    PpOpt,
    SeedOpt,
    StagesOpt,
    StopOpt,
    StreamOpt,
    StreamPrinter,
    TemperatureOpt,
    TimeoutOpt,
    TopKOpt,
    TopPOpt,
    TpOpt,
    TpSharesOpt,
    TpUnsetOpt,
    VerboseOpt,
    WeightsOpt,
    app,
    completion_json,
    err,
    print_completions,
    run_guarded,
    setup_logging,
    summary_line,
)


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts, generated together as one batch")],
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    chat: ChatOpt = False,
    stream: StreamOpt = False,
    as_json: JsonOpt = False,
    compile: CompileOpt = None,
    compile_mode: CompileModeOpt = None,
    kv_memory: KvMemoryOpt = None,
    weights: WeightsOpt = "auto",
    sync_output: Annotated[bool, typer.Option("--sync-output", help="read each step's tokens before launching the "
                                                                   "next (the old, slower mode; for comparison)")] = False,
    offload_weights: Annotated[float, typer.Option(help="share of layers kept in host memory and streamed in")] = 0.0,
    gpu_memory: Annotated[Optional[str], typer.Option(help="the GPU memory the model may use, e.g. 12GiB: layers "
                                                      "beyond it are streamed over PCIe or run on the CPU as a "
                                                      "pipeline stage, whichever measures faster (--offload)",
                                                      show_default=False)] = None,
    offload: Annotated[str, typer.Option(help="with --gpu-memory: auto (measured), stream or cpu")] = "auto",
    tp: TpUnsetOpt = None,
    pp: PpOpt = None,
    layer_split: LayerSplitOpt = None,
    micro_batches: MicroBatchesOpt = None,
    stages: StagesOpt = None,
    tp_shares: TpSharesOpt = None,
    timeout: TimeoutOpt = 300.0,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="keep generating past end-of-sequence")] = False,
    compressed_allreduce: CompressedAllReduceOpt = None,
    overlap_prefill: Annotated[bool, typer.Option("--overlap-prefill", help="TP prefill in two micro-batches, each "
                                                  "one's all-reduces under the other's matmuls")] = False,
    allreduce: AllReduceOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Generate completions for PROMPTS."""
    setup_logging(verbose)

    def run() -> None:
        nonlocal offload_weights, kv_memory, stages, device  # --gpu-memory decides them
        from ferry.api import LLM
        from ferry.device import dtype_name
        from ferry.engine.sampling import SamplingParams
        from ferry.errors import FerryError
        from ferry.parallel.launch import under_torchrun
        from ferry.parallel.layout import check_parallel_options, check_pipeline_options
        from ferry.parallel.mesh import Mesh, check_mesh, mesh_under_torchrun, torchrun_layout
        from ferry.parallel.placement import placement_from_options

        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
        )
        if gpu_memory is not None:
            way = _offload_way(model, device, dtype, gpu_memory, offload, len(prompts), max_tokens,
                               dict(tp=tp, pp=pp, stages=stages, tp_shares=tp_shares, offload_weights=offload_weights))
            if way.way == "stream":
                offload_weights = way.host_layers / (way.host_layers + way.gpu_layers)
                kv_memory = kv_memory or f"{_kv_gib(gpu_memory):.2f}GiB"
            elif way.way == "cpu-stage":
                stages, device = way.stages, None
                kv_memory = kv_memory or f"{_kv_gib(gpu_memory):.2f}GiB"
        placement = placement_from_options(stages, tp_shares, device, tp, pp, layer_split)
        if placement is not None and under_torchrun():
            raise FerryError("--stages and --tp-shares are not offered under torchrun yet (each process takes its "
                             "node's device); run them on one machine")
        # Under torchrun the rank count is torchrun's: TP inside a node and PP across nodes unless told otherwise.
        if placement is not None:
            mesh = Mesh(placement.tp, placement.pp)
        elif under_torchrun():
            mesh = mesh_under_torchrun(tp, pp, *torchrun_layout())
        else:
            mesh = check_mesh(1 if tp is None else tp, 1 if pp is None else pp)
        check_parallel_options(mesh.tp, weights, offload_weights, compressed_allreduce, allreduce)
        compiled = bool(compile) or compile_mode is not None  # one-shot: compiled only when asked
        check_pipeline_options(mesh.pp, layer_split, micro_batches, compiled, overlap_prefill, weights, offload_weights,
                               sync_output)
        if mesh.world > 1 or under_torchrun():
            engine_options = dict(compile=compiled, compile_mode=compile_mode, kv_memory=kv_memory,
                                  sync_output=sync_output, overlap_prefill=overlap_prefill)
            if mesh.pp > 1:
                engine_options = dict(kv_memory=kv_memory)
            _generate_tp(prompts, params, model, device, dtype, chat, as_json, mesh, compressed_allreduce,
                         engine_options, allreduce, layer_split, micro_batches, timeout, placement)
            return
        llm = LLM(model, device=device, dtype=dtype, show_progress=True, compile=compiled,
                  compile_mode=compile_mode, weights=weights, sync_output=sync_output, offload_weights=offload_weights,
                  overlap_prefill=overlap_prefill, kv_memory=kv_memory)
        if verbose:
            err(f"ferry: model {llm.model_path.name} on {llm.device} ({llm.dtype}), "
                 f"loaded in {llm.loaded.load_seconds:.2f} s, decode path {llm.engine.decode_path}")
            kv = getattr(llm.engine, "kv_report", None)  # the static engine (--overlap-prefill) has a dense cache
            if kv:
                err(f"ferry: KV cache {kv['blocks']} blocks of {kv['block_size']} tokens ({kv['tokens']} tokens, "
                    f"{kv['gib']} GiB, {kv['budget']}); {kv['full_context_sequences']} full-context sequences fit")
        out = sys.stderr if as_json else sys.stdout
        printer = StreamPrinter(out, len(prompts)) if stream else None
        completions = llm.generate(prompts, params, chat=chat, on_token=printer)
        if printer:
            printer.close()
        if as_json:
            doc = {
                "model": str(llm.model_path),
                "device": str(llm.device),
                "dtype": dtype_name(llm.dtype),
                "completions": [completion_json(p, c) for p, c in zip(prompts, completions, strict=True)],
            }
            print(json.dumps(doc), flush=True)
            return
        if not stream:
            print_completions(completions)
        err(summary_line(completions))

    run_guarded(run)


def _kv_gib(gpu_memory: str) -> float:
    from ferry.parallel.offload_plan import KV_SHARE, parse_size

    return parse_size(gpu_memory) * KV_SHARE / (1 << 30)


def _offload_way(model, device, dtype, gpu_memory: str, offload: str, batch: int, max_tokens: int, others: dict):
    """`--gpu-memory`: where the layers beyond the budget go (offload_plan.py), measured on this machine and said
    on stderr."""
    import torch

    from ferry.device import resolve_device, resolve_dtype
    from ferry.errors import FerryError
    from ferry.model.loader import open_checkpoint, resolve_model_path
    from ferry.parallel.offload_plan import choose, gpu_layers_within, measure_devices, parse_size

    if offload not in ("auto", "stream", "cpu"):
        raise FerryError(f"--offload {offload!r}: choose auto, stream or cpu")
    for flag, value in others.items():
        if value:
            raise FerryError(f"--gpu-memory places the layers itself on one GPU and the host; drop "
                             f"--{flag.replace('_', '-')}")
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise FerryError("--gpu-memory budgets a GPU's memory; this run has none (--device cpu or no GPU)")
    budget = parse_size(gpu_memory)
    config = open_checkpoint(resolve_model_path(model))[1]
    gpu_dtype = resolve_dtype(dtype, dev)
    if gpu_layers_within(config, gpu_dtype.itemsize, budget) >= config.num_layers:
        err(f"ferry: --gpu-memory {gpu_memory}: all {config.num_layers} layers fit; nothing is offloaded")
        return choose(config, gpu_dtype.itemsize, budget, batch, None, None, None)
    gpu, cpu, h2d = measure_devices(config, dev, gpu_dtype, resolve_dtype(dtype, torch.device("cpu")))
    way = choose(config, gpu_dtype.itemsize, budget, batch, gpu, cpu, h2d, force=offload)
    err(f"ferry: {way.why}: {'streaming them' if way.way == 'stream' else 'a CPU stage, --stages ' + way.stages}")
    return way


def _generate_tp(prompts, params, model, device, dtype, chat, as_json, mesh, compression, engine_options,
                 allreduce, layer_split, micro_batches, timeout, placement=None) -> None:
    """`--tp N --pp M` (or `--stages`): spawn N x M ranks (or join torchrun's), each loading only its stage's
    shard; rank 0 prints."""
    import torch

    from ferry.device import resolve_device
    from ferry.engine.engine import Completion
    from ferry.model.loader import open_checkpoint, resolve_model_path
    from ferry.parallel.launch import spawn, torchrun_group, under_torchrun
    from ferry.parallel.layout import check_launch
    from ferry.parallel.placement import check_fits
    from ferry.parallel.tp_generate import GenerateJob, PipelineSpec, run_generate

    dev = resolve_device(device) if placement is None else torch.device(placement.rank(0).device_type)
    path = resolve_model_path(model)
    _, config, _ = open_checkpoint(path)
    pipeline = PipelineSpec(mesh.pp, layer_split, micro_batches, timeout) if mesh.pp > 1 else None
    job = GenerateJob(str(path), dev.type, dtype, tuple(prompts), params, chat, engine_options, allreduce, pipeline,
                      placement)
    if placement is not None:
        check_fits(placement, config)
        result = spawn(mesh.world, dev.type, run_generate, (job,), timeout_s=timeout, compression=compression,
                       placement=placement)
    elif under_torchrun():
        check_launch(config, dev.type, mesh.tp, mesh.pp, layer_split, devices_needed=1)
        group = torchrun_group(dev.type, timeout_s=timeout, compression=compression)
        result = run_generate(group, job)
        if group.rank != 0:
            return
    else:
        check_launch(config, dev.type, mesh.tp, mesh.pp, layer_split)
        result = spawn(mesh.world, dev.type, run_generate, (job,), timeout_s=timeout, compression=compression)
    completions = [Completion(**c) for c in result.pop("completions")]
    if as_json:
        keys = ("model", "device", "dtype", "tp", "pp", "stages", "micro_batches", "load_s", "peak_host_mb_per_rank",
                "hidden_bytes_sent_per_rank", "allreduce_calls", "placement", "stage_dtypes", "speed_split",
                "tp_shares", "stage_times_per_rank")
        doc = {k: result[k] for k in keys if k in result}
        doc["completions"] = [completion_json(p, c) for p, c in zip(prompts, completions, strict=True)]
        print(json.dumps(doc), flush=True)
        return
    print_completions(completions)
    paths = ", ".join(f"{name} x{n}" for name, n in result["allreduce_calls"].items() if n) or "none"
    layout = f"tp={result['tp']}" + (f" x pp={result['pp']} ({', '.join(result['stages'])})" if "pp" in result else "")
    if "placement" in result:
        layout += " on " + " | ".join(f"{'+'.join(p['devices'])} {dt}" for p, dt in
                                      zip(result["placement"], result["stage_dtypes"], strict=True))
    if result.get("tp_shares"):
        layout += f", TP shares {', '.join(map(str, result['tp_shares']))}"
    err(f"{summary_line(completions)} ({layout}, peak host memory per rank "
        f"{', '.join(f'{m:.0f}' for m in result['peak_host_mb_per_rank'])} MB, all-reduce paths by eager call or graph capture: {paths})")


@app.command()
def chat(
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option()] = 512,
    temperature: Annotated[float, typer.Option()] = 0.0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    weights: WeightsOpt = "auto",
    compile: CompileOpt = None,
    compile_mode: CompileModeOpt = None,
    kv_memory: KvMemoryOpt = None,
    tp: TpOpt = 1,
    pp: PpOpt = None,
    layer_split: LayerSplitOpt = None,
    compressed_allreduce: CompressedAllReduceOpt = None,
    allreduce: AllReduceOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Interactive chat using the model's chat template (Ctrl-C stops an answer; /exit, Ctrl-D or Ctrl-C at the
    prompt quits; /reset starts over)."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.api import LLM
        from ferry.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        with LLM(model, device=device, dtype=dtype, show_progress=True, weights=weights, tp=tp, pp=1 if pp is None else pp,
                 layer_split=layer_split, compile=compile, compile_mode=compile_mode, kv_memory=kv_memory,
                 compressed_allreduce=compressed_allreduce, allreduce=allreduce) as llm:
            where = f"{llm.device}" + (f" x{tp} (tensor parallel)" if tp > 1 else "") + (
                f", {pp} pipeline stages" if pp is not None and pp > 1 else "")
            err(f"ferry: chatting with {llm.model_path.name} on {where}; Ctrl-C stops an answer, /reset starts "
                "over, /exit or Ctrl-D quits")
            _chat_loop(llm, params)

    run_guarded(run)


def _chat_loop(llm, params) -> None:
    """Ctrl-C while the model answers stops that answer; Ctrl-C at an empty prompt, Ctrl-D or /exit quits."""
    from ferry.commands.chat_input import prompt_reader

    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the tokenizer as their byte tokens
        sys.stdin.reconfigure(errors="surrogateescape")
    read_line, reader = prompt_reader()
    try:
        _converse(llm, params, read_line)
    finally:
        if reader is not None:
            reader.close()


def _converse(llm, params, read_line) -> None:
    history: list[dict[str, str]] = []
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history.clear()
            err("ferry: conversation cleared; the next message starts a new one")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(history), add_bos=False)
            sys.stdout.write("assistant> ")
            reply, stopped = _answer(llm, ids, params)
        except KeyboardInterrupt:  # Ctrl-C before the answer's own handler took over
            print()
            reply, stopped = "", True
        if stopped:
            history.pop()  # a cut answer would be continued as if complete; the turn is dropped
            err("ferry: answer stopped and left out of the conversation (Ctrl-C at the prompt or Ctrl-D quits)")
        else:
            history.append({"role": "assistant", "content": reply})


def _answer(llm, ids: list[int], params) -> tuple[str, bool]:
    """Stream one answer; returns its text and whether Ctrl-C stopped it. SIGINT only sets a flag here, read
    between tokens, so the engine is never interrupted inside a step (its cache and buffers stay consistent)."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    printer = StreamPrinter(sys.stdout, 1)
    parts: list[str] = []
    events = llm.stream_ids([ids], params)
    try:
        for event in events:
            printer(event)
            parts.append(event.text)
            if stop.is_set():
                break
    finally:
        events.close()
        signal.signal(signal.SIGINT, previous)
        printer.close()
    return "".join(parts), stop.is_set()
