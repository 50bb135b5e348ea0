"""The `ferry` command. User mistakes (FerryError) print one line and exit 2; nothing else is caught."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ferry.errors import FerryError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ferry: distributed LLM inference.")

ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF file or HF checkpoint folder [default: SmolLM2-135M-Instruct]")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N [default: cuda if present]")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="fp32, bf16, fp16 [default: bf16 on GPU, fp32 on CPU]")]
WeightsOpt = Annotated[str, typer.Option(help="native, or int8 (weight-only, CPU with --dtype bf16)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="log which paths ran and timings to stderr")]


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="ferry: %(name)s: %(message)s"
    )


def _run_guarded(fn) -> None:
    try:
        fn()
    except FerryError as exc:
        _err(f"ferry: error: {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _err("ferry: interrupted")
        raise typer.Exit(130) from None


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts, generated together as one batch")],
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate per prompt at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="same seed, same text")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="stop string (repeatable)")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap each prompt in the model's chat template")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="print tokens as they are produced")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print exactly one JSON object on stdout")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="CUDA: torch.compile the decode step (slower start)")] = False,
    compile_mode: Annotated[Optional[str], typer.Option(help="torch.compile mode, e.g. max-autotune-no-cudagraphs")] = None,
    weights: WeightsOpt = "native",
    verbose: VerboseOpt = False,
) -> None:
    """Generate completions for PROMPTS."""
    _setup_logging(verbose)

    def run() -> None:
        from ferry.api import LLM
        from ferry.engine.sampling import SamplingParams

        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop or ())
        )
        llm = LLM(model, device=device, dtype=dtype, show_progress=True, compile=compile or compile_mode is not None, compile_mode=compile_mode, weights=weights)
        if verbose:
            _err(f"ferry: model {llm.model_path.name} on {llm.device} ({llm.dtype}), "
                 f"loaded in {llm.loaded.load_seconds:.2f} s, decode path {llm.engine.decode_path}")
        out = sys.stderr if as_json else sys.stdout
        printer = _StreamPrinter(out, len(prompts)) if stream else None
        completions = llm.generate(prompts, params, chat=chat, on_token=printer)
        if printer:
            printer.close()
        if as_json:
            doc = {
                "model": str(llm.model_path),
                "device": str(llm.device),
                "dtype": str(llm.dtype).removeprefix("torch."),
                "completions": [
                    {
                        "prompt": p,
                        "text": c.text,
                        "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason,
                        "ttft_s": round(c.ttft_s, 6),
                        "tokens_per_s": round(c.tokens_per_s, 3),
                    }
                    for p, c in zip(prompts, completions, strict=True)
                ],
            }
            print(json.dumps(doc), flush=True)
            return
        if not stream:
            for i, c in enumerate(completions):
                prefix = f"[{i}] " if len(completions) > 1 else ""
                print(f"{prefix}{c.text}", flush=True)
        total = sum(len(c.token_ids) for c in completions)
        ttft = max(c.ttft_s for c in completions)
        rate = sum(c.tokens_per_s for c in completions)
        _err(f"ferry: {total} tokens generated, time to first token {ttft * 1000:.0f} ms, {rate:.1f} tokens/s")

    _run_guarded(run)


class _StreamPrinter:
    """Prints token text as it arrives; with several prompts, each run of text is tagged with its prompt."""

    def __init__(self, out, count: int) -> None:
        self.out, self.count, self.current = out, count, None

    def __call__(self, event) -> None:
        if not event.text:
            return
        if self.count > 1 and event.index != self.current:
            self.out.write(("\n" if self.current is not None else "") + f"[{event.index}] ")
            self.current = event.index
        self.out.write(event.text)
        self.out.flush()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


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
    _setup_logging(verbose)

    def run() -> None:
        from ferry.api import LLM
        from ferry.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        llm = LLM(model, device=device, dtype=dtype, show_progress=True, weights=weights)
        _err(f"ferry: chatting with {llm.model_path.name} on {llm.device}; /exit to quit, /reset to start over")
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
            printer = _StreamPrinter(sys.stdout, 1)
            [reply] = llm.engine.generate([ids], params, on_token=printer)
            printer.close()
            history.append({"role": "assistant", "content": reply.text})

    _run_guarded(run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
