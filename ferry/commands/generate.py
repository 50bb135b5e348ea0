"""`ferry generate` and `ferry chat`: local generation on one device."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ferry.commands import (
    ChatOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxTokensOpt,
    ModelOpt,
    SeedOpt,
    StopOpt,
    StreamOpt,
    StreamPrinter,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    VerboseOpt,
    WeightsOpt,
    app,
    completion_json,
    err,
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
    compile: Annotated[bool, typer.Option("--compile", help="CUDA: torch.compile the decode step (slower start)")] = False,
    compile_mode: Annotated[Optional[str], typer.Option(help="torch.compile mode, e.g. max-autotune-no-cudagraphs")] = None,
    weights: WeightsOpt = "native",
    sync_output: Annotated[bool, typer.Option("--sync-output", help="read each step's tokens before launching the "
                                                                   "next (the old, slower mode; for comparison)")] = False,
    offload_weights: Annotated[float, typer.Option(help="share of layers kept in host memory and streamed in")] = 0.0,
    verbose: VerboseOpt = False,
) -> None:
    """Generate completions for PROMPTS."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.api import LLM
        from ferry.engine.sampling import SamplingParams

        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop or ())
        )
        llm = LLM(model, device=device, dtype=dtype, show_progress=True, compile=compile or compile_mode is not None, compile_mode=compile_mode, weights=weights,
                  sync_output=sync_output, offload_weights=offload_weights)
        if verbose:
            err(f"ferry: model {llm.model_path.name} on {llm.device} ({llm.dtype}), "
                 f"loaded in {llm.loaded.load_seconds:.2f} s, decode path {llm.engine.decode_path}")
        out = sys.stderr if as_json else sys.stdout
        printer = StreamPrinter(out, len(prompts)) if stream else None
        completions = llm.generate(prompts, params, chat=chat, on_token=printer)
        if printer:
            printer.close()
        if as_json:
            doc = {
                "model": str(llm.model_path),
                "device": str(llm.device),
                "dtype": str(llm.dtype).removeprefix("torch."),
                "completions": [completion_json(p, c) for p, c in zip(prompts, completions, strict=True)],
            }
            print(json.dumps(doc), flush=True)
            return
        if not stream:
            for i, c in enumerate(completions):
                prefix = f"[{i}] " if len(completions) > 1 else ""
                print(f"{prefix}{c.text}", flush=True)
        err(summary_line(completions))

    run_guarded(run)


@app.command()
def chat(
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option()] = 512,
    temperature: Annotated[float, typer.Option()] = 0.0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    weights: WeightsOpt = "native",
    verbose: VerboseOpt = False,
) -> None:
    """Interactive chat using the model's chat template (/exit or Ctrl-D to quit, /reset to start over)."""
    setup_logging(verbose)

    def run() -> None:
        from ferry.api import LLM
        from ferry.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        llm = LLM(model, device=device, dtype=dtype, show_progress=True, weights=weights)
        err(f"ferry: chatting with {llm.model_path.name} on {llm.device}; /exit to quit, /reset to start over")
        history: list[dict[str, str]] = []
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            if line.strip() in ("/exit", "/quit"):
                return
            if line.strip() == "/reset":
                history.clear()
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(history), add_bos=False)
            sys.stdout.write("assistant> ")
            printer = StreamPrinter(sys.stdout, 1)
            [reply] = llm.engine.generate([ids], params, on_token=printer)
            printer.close()
            history.append({"role": "assistant", "content": reply.text})

    run_guarded(run)
