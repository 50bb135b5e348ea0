"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`; `LLM(model, tp=2)` for tensor parallelism,
`LLM(model, pp=2)` for pipeline stages (both: pp stages of tp ranks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from ferry.device import resolve_device
from ferry.engine.engine import Completion, Engine, TokenEvent, build_engine
from ferry.engine.sampling import SamplingParams


class LLM:
    """One model, loaded once. With `tp` > 1 the weights live in `tp` worker processes (one per GPU, or gloo
    processes on CPU), each holding its shard; this object drives them and keeps only the tokenizer. Call
    `close()` (or use `with LLM(...) as llm:`) to stop them early; they also stop when the object goes away."""

    def __init__(
        self,
        model: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        show_progress: bool = False,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        compile_mode: str | None = None,
        weights: str = "auto",
        sync_output: bool = False,
        offload_weights: float = 0.0,
        tp: int = 1,
        compressed_allreduce: str | None = None,
        allreduce: str = "auto",
        overlap_prefill: bool = False,
        kv_memory: str | float | None = None,
        pp: int = 1,
        layer_split: str | None = None,
        micro_batches: int | None = None,
        timeout_s: float = 300.0,
        stages: str | None = None,
        tp_shares: str | None = None,
    ) -> None:
        from ferry.parallel.layout import check_parallel_options, check_pipeline_options
        from ferry.parallel.mesh import Mesh, check_mesh
        from ferry.parallel.placement import placement_from_options

        # `stages` ("cuda:0=24,cpu=6", "cuda:0,cpu" or a placement file) and `tp_shares` ("2,1" or "auto") place
        # ranks on devices of different kinds and speeds, as the CLI's --stages and --tp-shares.
        self.placement = placement_from_options(stages, tp_shares, device if stages is None else None,
                                                None if stages else tp, None if stages else pp,
                                                None if stages else layer_split)
        if self.placement is not None:
            tp, pp = self.placement.tp, self.placement.pp
            device = device if stages is None else self.placement.rank(0).device_type
        mesh = check_mesh(tp, pp) if self.placement is None else Mesh(tp, pp)
        check_parallel_options(tp, weights, offload_weights, compressed_allreduce, allreduce)
        check_pipeline_options(pp, layer_split, micro_batches, bool(compile) or compile_mode is not None,
                               overlap_prefill, weights, offload_weights, sync_output)
        self.device = resolve_device(device)
        from ferry.model.loader import resolve_precision

        self.dtype, weights = resolve_precision(dtype, weights, model, self.device, mesh.world)
        self.tp, self.pp = tp, pp
        self.workers = None
        self.engine: Engine | None = None
        # compile None: the engine's default (CPU: the compiled decode step where it can run, FERRY_COMPILE=0 turns
        # it off; GPU: CUDA graphs, compiling refused: engine.py says why).
        compile = True if compile_mode is not None else compile
        engine_options = dict(cuda_graphs=cuda_graphs, compile=compile, compile_mode=compile_mode,
                              sync_output=sync_output, overlap_prefill=overlap_prefill, kv_memory=kv_memory)
        if mesh.world > 1:
            pipeline = None
            if pp > 1:
                from ferry.parallel.tp_generate import PipelineSpec

                pipeline = PipelineSpec(pp, layer_split, micro_batches, timeout_s)
                engine_options = dict(cuda_graphs=cuda_graphs, kv_memory=kv_memory)
            self._start_workers(model, dtype, engine_options, compressed_allreduce, allreduce, pipeline, timeout_s)
            return
        from ferry.model.loader import load_model

        self.loaded = load_model(model, self.device, self.dtype, show_progress=show_progress, weights=weights,
                                 offload_fraction=offload_weights)
        self.model_path = self.loaded.path
        self.tokenizer = self.loaded.tokenizer
        self.engine = build_engine(self.loaded.model, self.tokenizer, **engine_options)
        if compile or getattr(self.engine, "compiled_decode", None) is not None:
            self.engine.warm_up()  # the compile is paid here, where the log says so, not inside the first request

    def _start_workers(self, model, dtype, engine_options, compression, allreduce, pipeline, timeout_s) -> None:
        from ferry.model.loader import open_checkpoint, resolve_model_path
        from ferry.parallel.layout import check_launch
        from ferry.parallel.workers import TensorParallelWorkers, WorkerSpec

        path = resolve_model_path(model)
        _, config, self.tokenizer = open_checkpoint(path)
        if self.placement is not None:
            from ferry.parallel.placement import check_fits

            check_fits(self.placement, config)
        else:
            check_launch(config, self.device.type, self.tp, self.pp, pipeline.layer_split if pipeline else None)
        self.model_path = path
        spec = WorkerSpec(str(path), self.device.type, dtype, engine_options, allreduce, pipeline=pipeline,
                          placement=self.placement)
        self.workers = TensorParallelWorkers(spec, self.tp, compression=compression, timeout_s=timeout_s)

    @property
    def parallel_info(self) -> dict:
        """tp, pp, device, dtype and each rank's peak host memory after loading (MB); one rank reports only tp."""
        return dict(self.workers.info) if self.workers else {"tp": 1}

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | None = None,
        chat: bool = False,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> list[Completion]:
        return self.generate_ids([self.encode(p, chat) for p in prompts], params, on_token)

    def generate_ids(
        self,
        prompts: list[list[int]],
        params: SamplingParams | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> list[Completion]:
        params = params or SamplingParams()
        if self.workers:
            return self.workers.generate(prompts, params, on_token)
        return self.engine.generate(prompts, params, on_token=on_token)

    def stream(self, prompts: list[str], params: SamplingParams | None = None, chat: bool = False) -> Iterator[TokenEvent]:
        return self.stream_ids([self.encode(p, chat) for p in prompts], params)

    def stream_ids(self, prompts: list[list[int]], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Token events as they come. Leaving the loop early ends the request between two steps on one rank;
        tensor-parallel ranks finish it on their own (its events are skipped) before taking the next."""
        params = params or SamplingParams()
        if self.workers:
            return (e for e in self.workers.stream(prompts, params) if isinstance(e, TokenEvent))
        return self.engine.stream(prompts, params)

    def close(self) -> None:
        if self.workers:
            self.workers.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
