"""`ferry serve`: the OpenAI-compatible server (ferry/serve/)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ferry.commands import (
    AllReduceOpt,
    CompressedAllReduceOpt,
    DeviceOpt,
    DtypeOpt,
    KvMemoryOpt,
    LayerSplitOpt,
    MicroBatchesOpt,
    ModelOpt,
    PpOpt,
    StagesOpt,
    TimeoutOpt,
    TpUnsetOpt,
    VerboseOpt,
    app,
    err,
    run_guarded,
    setup_logging,
)
from ferry.errors import FerryError

API_KEY_ENV = "FERRY_API_KEY"


def load_api_key(path: Path | None) -> str | None:
    """The key clients must present: from --api-key-file, else $FERRY_API_KEY, else none (open server)."""
    if path is not None:
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise FerryError(f"cannot read --api-key-file {str(path)!r}: {exc.strerror}") from None
        if not key:
            raise FerryError(f"--api-key-file {str(path)!r} is empty")
        return key
    return os.environ.get(API_KEY_ENV, "").strip() or None


@app.command("serve")
def serve(
    model: ModelOpt = None,
    shape: Annotated[Optional[str], typer.Option(help="serve a named architecture with random weights instead "
                                                 "(llama3-8b, llama3-70b, tiny): speed runs; prompts as token ids")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0 picks a free one; the start line names it)")] = 8000,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    tp: TpUnsetOpt = None,
    pp: PpOpt = None,
    layer_split: LayerSplitOpt = None,
    micro_batches: MicroBatchesOpt = None,
    stages: StagesOpt = None,
    allreduce: AllReduceOpt = "auto",
    compressed_allreduce: CompressedAllReduceOpt = None,
    kv_memory: KvMemoryOpt = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="the model id clients name \\[default: the "
                                                             "file's or folder's name]")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help=f"require this key as a Bearer token (or set "
                                                         f"{API_KEY_ENV})")] = None,
    request_timeout_s: Annotated[float, typer.Option(help="a request still running after this long is ended")] = 600.0,
    drain_timeout_s: Annotated[float, typer.Option(help="on SIGTERM, how long requests in flight may finish")] = 30.0,
    max_waiting: Annotated[int, typer.Option(help="requests queued at most; more get 429")] = 1024,
    timeout: TimeoutOpt = 300.0,
    verbose: VerboseOpt = False,
) -> None:
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    setup_logging(verbose)

    def run() -> None:
        import torch

        from ferry.device import resolve_device
        from ferry.parallel.launch import torchrun_rank, under_torchrun
        from ferry.parallel.layout import check_launch, check_parallel_options, check_pipeline_options
        from ferry.parallel.mesh import Mesh, check_mesh, mesh_under_torchrun, torchrun_layout
        from ferry.parallel.placement import check_fits, placement_from_options
        from ferry.parallel.tp_generate import PipelineSpec
        from ferry.parallel.workers import WorkerSpec, serve_torchrun_rank
        from ferry.serve.app import ServerState, ServeSettings
        from ferry.serve.engine_client import AsyncEngine
        from ferry.serve.server import bind, run_server

        torchrun = under_torchrun()
        placement = placement_from_options(stages, None, device, None if tp in (None, 1) else tp, pp, layer_split)
        if placement is not None and torchrun:
            raise FerryError("--stages is not offered under torchrun (each process takes its node's device); run it "
                             "on one machine")
        if placement is not None:
            mesh = Mesh(placement.tp, placement.pp)
        elif torchrun:  # TP inside a node and PP across nodes unless told otherwise
            mesh = mesh_under_torchrun(tp, pp, *torchrun_layout())
        else:
            mesh = check_mesh(1 if tp is None else tp, 1 if pp is None else pp)
        check_parallel_options(mesh.tp, "native", 0.0, compressed_allreduce, allreduce)
        check_pipeline_options(mesh.pp, layer_split, micro_batches, False, False)
        for name, value in (("--request-timeout-s", request_timeout_s), ("--drain-timeout-s", drain_timeout_s),
                            ("--max-waiting", max_waiting), ("--timeout", timeout)):
            if not value > 0:
                raise FerryError(f"{name} must be > 0, got {value}")
        settings = ServeSettings(api_key=load_api_key(api_key_file), request_timeout_s=request_timeout_s,
                                 max_waiting=max_waiting)
        dev = resolve_device(device) if placement is None else torch.device(placement.rank(0).device_type)
        if dev.index not in (None, 0):
            raise FerryError(f"ferry serve places rank r on {dev.type}:r; to use {dev} choose the GPUs with "
                             "CUDA_VISIBLE_DEVICES")
        served, path, config = _open(model, shape, served_model_name)
        if placement is not None:
            check_fits(placement, config)
        else:
            check_launch(config, dev.type, mesh.tp, mesh.pp, layer_split, devices_needed=1 if torchrun else None)
        pipeline = PipelineSpec(mesh.pp, layer_split, micro_batches, timeout) if mesh.pp > 1 else None
        spec = WorkerSpec(str(path) if path else "", dev.type, dtype,
                          # compile None: the engine's default, the compiled decode step on one CPU rank
                          {"kv_memory": kv_memory, "max_waiting": max_waiting, "compile": None}, allreduce,
                          shape=shape,
                          pipeline=pipeline, placement=placement)
        if torchrun and torchrun_rank() != 0:  # an engine rank; rank 0's process serves HTTP and passes requests on
            serve_torchrun_rank(spec, timeout, compressed_allreduce)
            return
        bind(host, port).close()  # a taken port is an error now, not after the model has loaded
        engine = AsyncEngine(spec, mesh.tp, compression=compressed_allreduce, timeout_s=timeout, torchrun=torchrun)
        try:
            err(f"ferry: engine ready on {engine.info.get('device')} ({engine.info.get('dtype')}, {mesh}"
                f"{f', ranks from torchrun; SIGTERM to pid {os.getpid()} stops them all' if torchrun else ''})")
            state = ServerState(engine, served, settings)
            # Under torchrun an engine that stopped (a node died) ends the job: torchrun then ends the other nodes.
            run_server(state, host, port, drain_timeout_s, exit_on_engine_failure=torchrun)
        finally:
            engine.close()
        if engine.failure and torchrun:
            raise FerryError(f"the engine stopped: {engine.failure}")
        err("ferry: server stopped")

    run_guarded(run)


def _open(model: Path | None, shape: str | None, name: str | None):
    """(what the API serves, the checkpoint path or None for a shape, the model config); loads no weights."""
    from ferry.serve.app import ServedModel

    if shape is not None:
        from ferry.bench.shapes import SHAPES

        if shape not in SHAPES:
            raise FerryError(f"--shape {shape!r}: choose one of {', '.join(SHAPES)}")
        if model is not None:
            raise FerryError("--shape serves random weights; it cannot be combined with --model")
        config = SHAPES[shape]
        return ServedModel(name or shape, config.max_context, config.vocab_size, None), None, config
    from ferry.model.loader import open_checkpoint, resolve_model_path

    path = resolve_model_path(model)
    _, config, tokenizer = open_checkpoint(path)
    served = ServedModel(name or (path.stem if path.is_file() else path.name), config.max_context, config.vocab_size,
                         tokenizer)
    return served, path, config
