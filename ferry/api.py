"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from ferry.device import resolve_device, resolve_dtype
from ferry.engine.engine import Completion, Engine, TokenEvent
from ferry.engine.sampling import SamplingParams
from ferry.model.loader import load_model


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        show_progress: bool = False,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        weights: str = "native",
        sync_output: bool = False,
        offload_weights: float = 0.0,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.loaded = load_model(model, self.device, self.dtype, show_progress=show_progress, weights=weights,
                                 offload_fraction=offload_weights)
        self.tokenizer = self.loaded.tokenizer
        self.engine = Engine(self.loaded.model, self.tokenizer, cuda_graphs=cuda_graphs, compile=compile, compile_mode=compile_mode,
                             sync_output=sync_output)

    @property
    def model_path(self) -> Path:
        return self.loaded.path

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | None = None,
        chat: bool = False,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> list[Completion]:
        ids = [self.encode(p, chat) for p in prompts]
        return self.engine.generate(ids, params or SamplingParams(), on_token=on_token)

    def stream(self, prompts: list[str], params: SamplingParams | None = None, chat: bool = False) -> Iterator[TokenEvent]:
        return self.engine.stream([self.encode(p, chat) for p in prompts], params or SamplingParams())
