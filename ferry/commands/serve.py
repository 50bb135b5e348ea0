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
    TpOpt,
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
    tp: TpOpt = 1,
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
    verbose: VerboseOpt = False,
) -> None:
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    setup_logging(verbose)

    def run() -> None:
        import torch

        from ferry.device import resolve_device
        from ferry.parallel.layout import check_launch, check_parallel_options, check_pipeline_options
        from ferry.parallel.mesh import Mesh, check_mesh
        from ferry.parallel.placement import check_fits, placement_from_options
        from ferry.parallel.tp_generate import PipelineSpec
        from ferry.parallel.workers import WorkerSpec
        from ferry.serve.app import ServerState, ServeSettings
        from ferry.serve.engine_client import AsyncEngine
        from ferry.serve.server import bind, run_server

        placement = placement_from_options(stages, None, device, None if tp == 1 else tp, pp, layer_split)
        mesh = check_mesh(tp, 1 if pp is None else pp) if placement is None else Mesh(placement.tp, placement.pp)
        check_parallel_options(mesh.tp, "native", 0.0, compressed_allreduce, allreduce)
        check_pipeline_options(mesh.pp, layer_split, micro_batches, False, False)
        for name, value in (("--request-timeout-s", request_timeout_s), ("--drain-timeout-s", drain_timeout_s),
                            ("--max-waiting", max_waiting)):
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
            check_launch(config, dev.type, mesh.tp, mesh.pp, layer_split)
        bind(host, port).close()  # a taken port is an error now, not after the model has loaded
        pipeline = PipelineSpec(mesh.pp, layer_split, micro_batches) if mesh.pp > 1 else None
        spec = WorkerSpec(str(path) if path else "", dev.type, dtype,
                          # compile None: the engine's default, the compiled decode step on one CPU rank
                          {"kv_memory": kv_memory, "max_waiting": max_waiting, "compile": None}, allreduce,
                          shape=shape,
                          pipeline=pipeline, placement=placement)
        engine = AsyncEngine(spec, mesh.tp, compression=compressed_allreduce)
        try:
            err(f"ferry: engine ready on {engine.info.get('device')} ({engine.info.get('dtype')}, {mesh})")
            state = ServerState(engine, served, settings)
            run_server(state, host, port, drain_timeout_s)
        finally:
            engine.close()
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
