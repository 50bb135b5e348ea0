"""Decode-only steps of the serving engine on a CPU, through one torch.compile'd step (inductor's C++ backend).

An eager CPU decode step is made of per-op costs: SmolLM2-135M (30 layers, bf16, int4 weights) issues ~45 ops a
layer, each a few microseconds of dispatch for a few hundred values of work. Compiled, a layer is four fused C++
loops (norm, rotary + K/V write + attention, norm, SiLU*mul) around its four int4 matmuls, and the whole step is
one call. Measured on 2 cores at 300 tokens of context (2026-11-30): 15.3 ms a step eager, 12.9 ms compiled with
gather + SDPA attention, 9.0 ms with attention as fused loops (paged_attention.decode_as_loops), 8.1 ms with
inductor's C++ wrapper and fewer guards (below).

What makes it compile well:
- every K and V pool is its own tensor (paged_cache.py): views of one storage are aliased inputs, and each
  in-place K/V write then copies a whole pool;
- the block table's width is a dynamic size (StepInputs narrows it to the longest sequence's blocks, at least 2),
  so one graph serves every context length; a batch of several sequences gets a second, batch-dynamic graph;
- no guards on the model's modules (~700 for SmolLM2: with them dynamo's cache lookup took 0.8 ms a step):
  the engine owns the model and changes none of its attributes while it runs, and each engine compiles a step
  function with a code object of its own, so another model in the process (another dtype, other weight formats),
  whose engine has its own code object, never meets this one's graphs (dynamo keeps graphs per code object);
- `cpp_wrapper`: the step's ~250 kernel calls are made from C++ (0.5-0.7 ms a step less than Python's wrapper).

The first compile on a 2-core machine takes about 1.5 minutes; inductor's caches live in Ferry's cache folder
(compiled_step.inductor_cache_dir), and the next process spends ~7 s tracing. So long-lived processes (the Python
API, chat, serve) compile by default, a one-shot `ferry generate` does not (FERRY_COMPILE=0/1 sets the default).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import time

import torch

from ferry.engine.compiled_step import RECOMPILE_LIMIT, inductor_cache_dir
from ferry.errors import FerryError
from ferry.model.layers.attention import PagedBatch

log = logging.getLogger("ferry.compile")

PATH = "compiled (inductor C++)"
_engine_ids = itertools.count()


def compile_default() -> bool:
    """Whether a long-lived CPU engine compiles when nobody said: yes, unless FERRY_COMPILE=0."""
    return os.environ.get("FERRY_COMPILE", "1") != "0"


def compiler_missing() -> str | None:
    """Why inductor's C++ backend cannot build here, or None. It calls $CXX, else g++ (clang++ on macOS)."""
    wanted = os.environ.get("CXX") or ("clang++" if os.uname().sysname == "Darwin" else "g++")
    return None if shutil.which(wanted) else f"no C++ compiler ({wanted}) on PATH"


def ineligible(model, stage, streamed: bool) -> str | None:
    """Why this engine's decode step cannot be compiled on the CPU, or None."""
    if model.group.world_size > 1:
        return "tensor-parallel ranks all-reduce through the process group, which the compiled step does not take"
    if stage is not None:
        return "a pipeline stage runs its layers between sends and receives"
    if streamed:
        return "streamed layers (--offload-weights) are copied in between layers"
    if model.norm.weight.device.type != "cpu":
        return "the compiled step is the CPU's; a GPU replays CUDA graphs"
    return compiler_missing()


def step_function(model, layers: range | None):
    """A paged step (inputs [1, tokens] ids, or [1, tokens, hidden] into `layers`; positions; K/V pools; PagedBatch;
    rows to sample) -> the whole model's fp32 logits of those rows, or the layers' hidden states [tokens, hidden].
    A new function each call: CompiledCPUDecode gives its copy a code object of its own; eager callers call it."""
    if layers is None:
        def step(inputs, positions, kv, paged, logits_index):
            return model(inputs, positions, kv, 0, logits_index=logits_index, paged=paged)
    else:
        def step(inputs, positions, kv, paged, logits_index):
            return model.run_layers(inputs, positions, kv, 0, layers=layers, paged=paged)[0]
    return step


class CompiledCPUDecode:
    """One compiled decode step over a paged cache: the whole model (token ids in, logits out: the serving engine
    and the speculative draft) or its first layers (`layers`: hidden states in and out, the edge of a split, whose
    embedding is looked up eagerly from the checkpoint)."""

    def __init__(self, model, cache, mode: str | None = None, layers: range | None = None) -> None:
        import torch._dynamo

        self.cache, self.layers = cache, layers
        self.input_shape = (model.config.hidden_size,) if layers is not None else ()
        self.input_dtype = model.norm.weight.dtype if layers is not None else torch.int32
        folder = inductor_cache_dir()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        step = step_function(model, layers)
        step.__code__ = step.__code__.replace(co_name=f"ferry_cpu_decode_{next(_engine_ids)}")  # this engine's own
        options = {"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if mode is not None:  # torch.compile takes a mode or options, not both: the mode's options, without graphs
            from torch._inductor import list_mode_options

            options |= {k: v for k, v in list_mode_options(mode).items() if k != "triton.cudagraphs"}
        self.forward = torch.compile(step, options=options)
        self.code = step.__code__
        self.compile_seconds: dict[int, float] = {}  # 1, and 2 for the batch-dynamic graph -> its first call's time
        what = "decode step" if layers is None else f"step of layers {layers.start}..{layers.stop - 1}"
        log.info("CPU %s: torch.compile (inductor C++%s), compile cache %s", what,
                 f", mode {mode}" if mode else "", folder)

    def run(self, inputs: torch.Tensor, positions: torch.Tensor, paged, logits_index: torch.Tensor) -> torch.Tensor:
        """A decode-only step: [rows] token ids (or [rows, hidden] hidden states into `layers`) and positions, its
        PagedBatch, rows to sample (int32, as every caller makes them: the dtype is in the graph's guards) -> logits
        of those rows (or the layers' hidden states [rows, hidden])."""
        if any(t.is_inference() for t in (inputs, positions, paged.slots, paged.block_tables, paged.context_lens,
                                          logits_index)):
            # The graph's guards include each input's dispatch keys, which differ between tensors made inside and
            # outside inference mode: a step whose inputs are made inside it would compile the step again (seven
            # seconds a process on 2 cores). Every step is given ordinary tensors, as the warm-up's are.
            inputs, positions, logits_index = map(_ordinary, (inputs, positions, logits_index))
            paged = PagedBatch(slots=_ordinary(paged.slots), decode_rows=paged.decode_rows,
                               block_tables=_ordinary(paged.block_tables), context_lens=_ordinary(paged.context_lens))
        torch._dynamo.maybe_mark_dynamic(paged.block_tables, 1)
        rows = min(paged.decode_rows, 2)
        started = time.perf_counter() if rows not in self.compile_seconds else None
        out = self.forward(inputs.unsqueeze(0), positions.view(1, -1), self.cache.layers, paged, logits_index)
        if started is not None:
            self.compile_seconds[rows] = time.perf_counter() - started
            log.warning("CPU decode step for %s compiled in %.1f s", "one sequence" if rows == 1 else "batches",
                        self.compile_seconds[rows])
        return out

    @property
    def compiled_rows(self) -> set[int]:
        return set(self.compile_seconds)

    def warm_up(self, padding_block: int, block_size: int, batch: int = 1) -> None:
        """Compile before the first request: a step of `batch` rows (1, or several: the batch-dynamic graph) that
        writes into and reads only the padding block, which no sequence owns."""
        for rows in sorted({1, min(batch, 2)}):
            if rows in self.compile_seconds:
                continue
            with torch.inference_mode(False):  # ordinary tensors, as every step's (run)
                inputs = torch.zeros(rows, *self.input_shape, dtype=self.input_dtype)
                slots = torch.full((rows,), padding_block * block_size, dtype=torch.int32)
                tables = torch.full((rows, 2), padding_block, dtype=torch.int32)
                lens = torch.ones(rows, dtype=torch.int32)
                positions, index = torch.zeros(rows, dtype=torch.int32), torch.arange(rows, dtype=torch.int32)
            paged = PagedBatch(slots=slots, decode_rows=rows, block_tables=tables, context_lens=lens)
            with torch.inference_mode():
                self.run(inputs, positions, paged, index)


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def choose(compile: bool | None, mode: str | None, model, stage=None, streamed: bool = False) -> tuple[bool, str]:
    """Whether a CPU step compiles (`compile` True: asked, an error where it cannot; None: where it can unless
    FERRY_COMPILE=0; False: never), and the step's path for logs."""
    asked = bool(compile) or mode is not None
    if not (asked or (compile is None and compile_default())):
        return False, "eager"
    reason = ineligible(model, stage, streamed)
    if reason is not None:
        if asked:
            check_compile_request(model.norm.weight.device, reason)
        log.info("decode step: eager (%s)", reason)
        return False, f"eager ({reason})"
    return True, PATH


def check_compile_request(device: torch.device, reason: str | None) -> None:
    if reason is not None:
        raise FerryError(f"--compile on {device.type}: the decode step cannot be compiled here ({reason}); "
                         "run without --compile")
