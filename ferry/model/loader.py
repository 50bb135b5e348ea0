"""load_model: a path (GGUF file or HF folder) -> model on its device, tokenizer, load statistics."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ferry.comm.group import ParallelGroup
from ferry.device import resolve_dtype
from ferry.errors import FerryError, ModelNotFoundError
from ferry.memory import release_freed_heap
from ferry.model.config import ModelConfig
from ferry.model.default_model import default_model_path
from ferry.model.layers.embedding import VocabParallelEmbedding
from ferry.model.layers.quant import check_quantized_supported, qmatmul_unavailable
from ferry.model.llama import LayerSpan, LlamaForCausalLM
from ferry.model.tokenizer import FerryTokenizer
from ferry.model.weights import packed_cache
from ferry.model.weights.gguf_file import GGUFWeights
from ferry.model.weights.repack import INT4_TYPES
from ferry.model.weights.source import WeightSource

log = logging.getLogger("ferry.load")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: FerryTokenizer
    config: ModelConfig
    path: Path
    load_seconds: float
    # A partial model (open_partial): the checkpoint stays open and only `layers_read` decoder layers hold values.
    source: WeightSource | None = None
    layers_read: int | None = None  # None: the whole model is loaded

    @property
    def partial(self) -> bool:
        return self.layers_read is not None


def open_checkpoint(path: Path) -> tuple[WeightSource, ModelConfig, FerryTokenizer]:
    if path.is_file() and path.suffix == ".gguf":
        source = GGUFWeights(path)
        config = ModelConfig.from_gguf(source.metadata, source.tensor_names)
        return source, config, FerryTokenizer.from_gguf(source.metadata)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return open_checkpoint(ggufs[0])
        config_path = path / "config.json"
        if not config_path.exists():
            raise ModelNotFoundError(f"{path}: no config.json (and not exactly one .gguf file) in this folder")
        config = ModelConfig.from_hf(json.loads(config_path.read_text()))
        from ferry.model.weights.safetensors_dir import SafetensorsWeights  # here: a GGUF run never needs it

        source = SafetensorsWeights(path)
        return source, config, FerryTokenizer.from_folder(path, config.eos_token_ids, config.bos_token_id)
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist")
    raise ModelNotFoundError(f"{str(path)!r} is neither a .gguf file nor a Hugging Face checkpoint folder")


def build_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, group: ParallelGroup,
                host_layers: frozenset[int] = frozenset(), span: LayerSpan | None = None) -> LlamaForCausalLM:
    """Parameters allocated (uninitialised) straight on `device` in `dtype`; decoder layers in `host_layers` in
    host memory instead (streamed layers: a model larger than the device never has to fit on it).

    `span`: a pipeline stage's layers; only they (and the embedding, norm and head where the stage needs them)
    get memory, everything else stays on the meta device."""
    span = span or LayerSpan.whole(config.num_layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, group)
    model = model.to(dtype)
    model.span = span
    model.rotary.to_empty(device=device)
    model.norm.to_empty(device=device)  # every stage: a few KiB, and the engine reads device and dtype off it
    if model.holds_embedding():
        model.embed_tokens.to_empty(device=device)
    if span.last and not config.tie_word_embeddings:
        model.lm_head.to_empty(device=device)
    for i in span.layers:
        model.layers[i].to_empty(device=torch.device("cpu") if i in host_layers else device)
    model.eval()
    if config.tie_word_embeddings and model.holds_embedding():
        model.lm_head.tie_to(model.embed_tokens)  # to_empty gives each module its own storage
    return model


def resolve_model_path(path: str | Path | None) -> Path:
    """The checkpoint a user named, or the default model (provisioned if absent)."""
    return Path(path).expanduser() if path else default_model_path()


WEIGHT_FORMATS = ("auto", "native", "int8", "quantized")


def check_weight_format(weights: str) -> None:
    if weights not in WEIGHT_FORMATS:
        raise FerryError(f"unknown weight format {weights!r} (choose {', '.join(WEIGHT_FORMATS)})")


def has_int4_blocks(source: WeightSource) -> bool:
    return isinstance(source, GGUFWeights) and any(t.qtype in INT4_TYPES for t in source.tensors.values())


def choose_weights(weights: str, source: WeightSource, device: torch.device, dtype: torch.dtype,
                   group: ParallelGroup) -> str:
    """`auto` is the fastest correct format for this run: on one CPU rank in bf16, a GGUF with 4-bit blocks keeps
    them ("quantized"); everything else loads "native". fp32 stays exact: it never quantizes."""
    check_weight_format(weights)
    if weights != "auto":
        return weights
    fast = device.type == "cpu" and dtype == torch.bfloat16 and group.world_size == 1 and has_int4_blocks(source)
    return "quantized" if fast else "native"


def resolve_precision(dtype_name: str | None, weights: str, path: str | Path | None, device: torch.device,
                      world: int = 1) -> tuple[torch.dtype, str]:
    """The activation dtype and weight format of a run, from the user's `--dtype` and `--weights`.

    With both left to `auto` on one CPU rank, a GGUF model whose blocks Ferry's qmatmul takes (where it is built)
    runs fp32 activations over the checkpoint's own 4/8-bit blocks: qmatmul quantizes each activation row to int8
    from fp32 as llama.cpp does, so bf16 around it would only add a second rounding (same decode speed, teacher-
    forced top-1 96.1% vs 94.9% against the fp32 model, benchmarks/results/2026-12-01_cpu_decode_run1.md). Everything
    else keeps resolve_dtype's choice and `choose_weights` at load; an explicit `--dtype fp32` stays exact."""
    check_weight_format(weights)
    dtype = resolve_dtype(dtype_name, device, tp=world)
    if dtype_name not in (None, "auto") or weights != "auto" or device.type != "cpu" or world != 1:
        return dtype, weights
    if resolve_model_path(path).suffix != ".gguf" or qmatmul_unavailable() is not None:
        return dtype, weights
    return torch.float32, "quantized"


def load_model(
    path: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
    group: ParallelGroup | None = None,
    show_progress: bool = True,
    weights: str = "auto",
    offload_fraction: float = 0.0,
    span: LayerSpan | None = None,
) -> LoadedModel:
    """`weights`: "native" keeps the checkpoint's values in `dtype`; "int8" quantizes every matmul weight to int8
    rows; "quantized" keeps GGUF Q4_0/Q4_1 matmuls as the checkpoint's own int4 groups and makes the rest int8 rows
    (CPU, bf16); "auto" (the default) picks (choose_weights).
    `offload_fraction`: that share of decoder layers lives in (pinned) host memory and is streamed to the device
    ahead of its use (see ferry/comm/weight_stream.py).
    `span`: a pipeline stage's decoder layers; only its tensors are read (native weights)."""
    group = group or ParallelGroup.single()
    check_weight_format(weights)  # before the checkpoint is opened: a typo costs nothing
    if weights in ("int8", "quantized"):
        check_quantized_supported(device, dtype, weights)
    if not 0.0 <= offload_fraction <= 1.0:
        raise FerryError(f"--offload-weights must be a fraction in [0, 1], got {offload_fraction}")
    if offload_fraction and weights not in ("native", "auto"):
        raise FerryError(f"--offload-weights streams native weights; it does not combine with --weights {weights}")
    started = time.perf_counter()
    resolved = resolve_model_path(path)
    cache_folder = None
    # The packed cache holds quantized loads only: "auto" quantizes in bf16 alone (choose_weights), so an fp32 "auto"
    # load (exact) must never meet the entry an fp32 "quantized" one (qmatmul's blocks) left under the same dtype.
    quantizing = weights == "quantized" or (weights == "auto" and dtype == torch.bfloat16)
    if (resolved.suffix == ".gguf" and resolved.is_file() and device.type == "cpu" and group.world_size == 1
            and span is None and not offload_fraction and quantizing):
        cache_folder = packed_cache.entry_folder(resolved, dtype)
        hit = packed_cache.load(cache_folder, device, dtype)
        if hit is not None:
            model, config, tokenizer = hit
            seconds = time.perf_counter() - started
            log.info("loaded %s (%s, %s, quantized weights: %s) in %.2f s from the packed cache %s", resolved.name,
                     device, dtype, model.weight_formats(), seconds, cache_folder)
            return LoadedModel(model, tokenizer, config, resolved, seconds)
    source, config, tokenizer = open_checkpoint(resolved)
    if span is not None and (weights not in ("auto", "native") or offload_fraction):
        raise FerryError(f"--weights {weights} and --offload-weights are not offered with pipeline stages")
    if span is not None and span.stop > config.num_layers:
        raise FerryError(f"pipeline stage {span} is beyond the model's {config.num_layers} layers")
    partial = span is not None and span != LayerSpan.whole(config.num_layers)
    weights = "native" if offload_fraction or partial else choose_weights(weights, source, device, dtype, group)
    streamed = streamed_layers(config.num_layers, offload_fraction)
    model = build_model(config, device, dtype, group, host_layers=frozenset(streamed), span=span)
    model.keep_quantized(weights == "quantized")
    streamer = stream_layers(model, streamed) if streamed else None  # before loading: weights land in pinned memory
    with torch.no_grad(), _progress(show_progress, resolved.name) as advance:
        model.load(source, progress=advance)
        if weights == "int8" or (weights == "quantized" and dtype == torch.bfloat16):
            model.quantize_int8()  # what is not int4 already (int8 rows need bf16 activations)
    if streamer:
        streamer.activate()
    seconds = time.perf_counter() - started
    log.info("loaded %s%s (%s, %s, %s weights: %s) in %.2f s", resolved.name, f" {span}" if partial else "",
             device, dtype, weights, model.weight_formats(), seconds)
    if cache_folder is not None and weights == "quantized" and model.keeps_blocks():
        try:  # after the timing: the next load is the one that gains
            packed_cache.save(cache_folder, model, config, tokenizer)
            log.info("kept the packed weights for the next load in %s", cache_folder)
        except OSError as exc:
            log.warning("could not keep the packed weights in %s (%s); the next load converts again", cache_folder,
                        exc)
    return LoadedModel(model, tokenizer, config, resolved, seconds)


def open_partial(path: str | Path | None, device: torch.device, dtype: torch.dtype, weights: str = "auto") -> LoadedModel:
    """A model with nothing read yet but its final norm and rotary tables: what a split edge starts from.

    The embedding looks its rows up in the (memory-mapped) checkpoint (CheckpointRowsEmbedding) and every other
    parameter stays on the meta device, taking no memory, until `load_layers` reads decoder layers 0..K-1 or the
    whole model. Opening costs the header and tokenizer only (~0.1 s for SmolLM2), so the caller can check its
    arguments against the config, and with a cloud, before spending seconds and memory on weights.
    """
    from ferry.model.layers.embedding import CheckpointRowsEmbedding

    started = time.perf_counter()
    resolved = resolve_model_path(path)
    source, config, tokenizer = open_checkpoint(resolved)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, ParallelGroup.single()).to(dtype)
    model.eval()
    # The edge's layers take the same fast path a whole model would (the GGUF's blocks on the CPU: resolve_precision).
    if weights == "quantized":
        check_quantized_supported(device, dtype, weights)
    model.keep_quantized(choose_weights(weights, source, device, dtype, ParallelGroup.single()) == "quantized")
    allocate(model.norm, device)
    with torch.no_grad():
        model.norm.load(source, "model.norm")
    model.embed_tokens = CheckpointRowsEmbedding(source, "model.embed_tokens.weight", config.vocab_size, dtype, device)
    model.load_rotary(source)
    _forget_vocabulary(source)
    _release_load_memory(source)
    return LoadedModel(model, tokenizer, config, resolved, time.perf_counter() - started, source, layers_read=0)


def _forget_vocabulary(source: WeightSource) -> None:
    """A partial model keeps its checkpoint open for the embedding rows; the GGUF vocabulary, merges and token types
    in its metadata (~100k Python strings and ints, ~10 MiB for SmolLM2) are in the tokenizer by now."""
    metadata = getattr(source, "metadata", None)
    if isinstance(metadata, dict):
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.scores"):
            metadata.pop(key, None)


@torch.no_grad()
def load_layers(loaded: LoadedModel, count: int | None) -> None:
    """Read decoder layers up to `count` of a partial model (those already read are kept); `count=None` completes
    it into the whole model: every layer, the dense embedding table and the LM head. No-op on a whole model."""
    if not loaded.partial:
        return
    assert loaded.source is not None
    model, source, config = loaded.model, loaded.source, loaded.config
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    started, first = time.perf_counter(), loaded.layers_read
    stop = config.num_layers if count is None else min(count, config.num_layers)
    if count is None:
        # The dense table first: its dequantization temporaries (~2x the table) are freed before the layers are
        # allocated and reuse that memory; read last, they came on top of every layer (+240 MiB peak, measured).
        with torch.device("meta"):
            embedding = VocabParallelEmbedding(config.vocab_size, config.hidden_size, model.group).to(dtype)
        allocate(embedding, device)
        embedding.load(source, "model.embed_tokens")
        model.embed_tokens = embedding
        if config.tie_word_embeddings:
            model.lm_head.tie_to(embedding)
            model.lm_head.load_quantized(source, "model.embed_tokens")
        else:
            allocate(model.lm_head, device)
            if not model.lm_head.load_quantized(source, "lm_head"):
                model.lm_head.load(source, "lm_head")
        _release_load_memory(source)
    for i in range(first, stop):
        allocate(model.layers[i], device)
        model.layers[i].load(source, f"model.layers.{i}")
        _release_load_memory(source)
    loaded.layers_read = max(first, stop)
    if count is None:
        loaded.source, loaded.layers_read = None, None
    if stop > first or count is None:
        what = "the whole model" if count is None else f"decoder layers {first}..{stop - 1}"
        log.info("read %s of %s in %.2f s", what, loaded.path.name, time.perf_counter() - started)


def _release_load_memory(source: WeightSource) -> None:
    """After a partial model read a piece: the checkpoint pages it touched and the temporaries it freed go back to
    the system, so a split edge's peak is its largest piece, not the sum of what each piece left behind."""
    release = getattr(source, "release_pages", None)
    if release is not None:
        release()
    release_freed_heap()


def allocate(module: torch.nn.Module, device: torch.device) -> None:
    """Give a meta module's parameters (uninitialised) memory on `device`: what `to_empty` does, without its
    meta -> device path, which imports sympy and mpmath (~35 MiB resident, measured) that a small edge process
    otherwise never needs. Parameters shared between submodules are not expected here."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                                           requires_grad=False)


def streamed_layers(num_layers: int, fraction: float) -> list[int]:
    """The last `fraction` of the decoder layers: the ones kept in host memory."""
    count = round(fraction * num_layers)
    return list(range(num_layers - count, num_layers))


def stream_layers(model: LlamaForCausalLM, streamed: list[int], activate: bool = False):
    """Pack the `streamed` layers into pinned host buffers (their parameters become views of them) and, once
    `activate()` runs, stream them into two device slots on each forward. Returns the LayerStreamer."""
    from ferry.comm.weight_stream import LayerStreamer

    device = model.norm.weight.device
    model.weight_streamer = LayerStreamer(list(model.layers), streamed, device, activate=activate)
    model.register_forward_pre_hook(lambda module, args: module.weight_streamer.start())
    return model.weight_streamer


class _progress:
    """A rich progress bar on stderr over the decoder layers (silent when disabled)."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.label = label
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("loading {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task(self.label, total=None)

        def advance(done: int, total: int) -> None:
            self.bar.update(task, completed=done, total=total)

        return advance

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
