"""One CPU decode run of each engine a CPU user could pick: Ferry (any dtype and weight format), Hugging Face
transformers, and llama.cpp through llama-cpp-python. Each runner loads once, then answers `run(prompt_ids, n)`
with (prefill seconds, decode tokens/s), timing a greedy stream of n tokens the same way: prefill is the time to
the first token, decode the tokens after it over the time after it."""

from __future__ import annotations

import time
from pathlib import Path

import torch


class FerryRunner:
    """`compile`: the LLM option (None: Ferry's default). `load()` answers the model's load time; the decode step's
    compile (warm-up, paid once per process, cached per machine) is kept apart in `compile_seconds`."""

    def __init__(self, name: str, dtype: str | None, weights: str, compile: bool | None = None) -> None:
        self.name, self.dtype, self.weights, self.compile = name, dtype, weights, compile
        self.llm = None
        self.path = ""
        self.compile_seconds: list[float] = []

    def load(self) -> float:
        from ferry.api import LLM

        if self.llm is not None:
            self.llm.close()
        started = time.perf_counter()
        self.llm = LLM(device="cpu", dtype=self.dtype, weights=self.weights, compile=self.compile,
                       show_progress=False)
        seconds = time.perf_counter() - started
        compiled = self.llm.engine.compiled_decode
        if compiled is not None:  # the warm-up's compile, inside the constructor
            self.compile_seconds.append(sum(compiled.compile_seconds.values()))
            seconds -= self.compile_seconds[-1]
        model = self.llm.loaded.model
        self.path = f"{self.llm.dtype} activations, matmuls {model.weight_formats()}, {self.llm.engine.decode_path}"
        return seconds

    def run(self, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
        from ferry.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        started = time.perf_counter()
        stamps = [time.perf_counter() for _ in self.llm.stream_ids([prompt_ids], params)]
        return _split(started, stamps)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()


class TransformersRunner:
    """The reference implementation, fp32, greedy with its own KV cache (no sampling code in the loop)."""

    name = "transformers fp32"

    def __init__(self, gguf: Path) -> None:
        self.gguf, self.model, self.path = gguf, None, ""

    def load(self) -> float:
        import transformers

        started = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(self.gguf.parent), gguf_file=self.gguf.name, dtype=torch.float32).eval()
        self.path = f"transformers {transformers.__version__}, fp32 (dequantized GGUF)"
        return time.perf_counter() - started

    @torch.inference_mode()
    def run(self, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
        started = time.perf_counter()
        out = self.model(torch.tensor([prompt_ids]), use_cache=True)
        stamps = [time.perf_counter()]
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens - 1):
            out = self.model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            stamps.append(time.perf_counter())
        return _split(started, stamps)

    def close(self) -> None:
        self.model = None


class LlamaCppRunner:
    """llama.cpp on the same GGUF file and thread count, greedy (top_k=1), through its Python binding."""

    name = "llama.cpp"

    def __init__(self, gguf: Path, threads: int, context: int) -> None:
        self.gguf, self.threads, self.context = gguf, threads, context
        self.llm, self.path = None, ""

    def load(self) -> float:
        import llama_cpp

        started = time.perf_counter()
        self.llm = llama_cpp.Llama(str(self.gguf), n_threads=self.threads, n_threads_batch=self.threads,
                                   n_ctx=self.context, n_batch=512, verbose=False)
        self.path = f"llama-cpp-python {llama_cpp.__version__}, the GGUF's own quantized kernels"
        return time.perf_counter() - started

    def run(self, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
        self.llm.reset()
        started = time.perf_counter()
        stamps = []
        for _ in self.llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:
                break
        return _split(started, stamps)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()


def _split(started: float, stamps: list[float]) -> tuple[float, float]:
    """(time to the first token, tokens/s of the rest)."""
    if len(stamps) < 2:
        raise RuntimeError(f"expected a stream of tokens, got {len(stamps)}")
    return stamps[0] - started, (len(stamps) - 1) / (stamps[-1] - stamps[0])
