"""The `ferry` command's app and what its subcommands share: options, error handling, output.

User mistakes (FerryError) print one line and exit 2; nothing else is caught."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from ferry.errors import FerryError


class _FlagsTakeNoValue:
    """A flag shows no `<bool>` value to type in help (Typer 0.29 shows one for every flag, --help included)."""

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)  # with --help, which is made here
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""  # the type column shows the metavar when one is set
        return params


class FerryCommand(_FlagsTakeNoValue, TyperCommand):
    """The usage line names arguments the classic way (`PROMPTS...`, `[NAME]` when optional) where Typer
    writes `{prompts}...`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "").upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class FerryGroup(_FlagsTakeNoValue, TyperGroup):
    pass


class FerryTyper(typer.Typer):
    """A Typer whose commands are FerryCommands and whose groups FerryGroups (the `ferry` app and `bench`)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cls=FerryGroup, **kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or FerryCommand, **kwargs)


app = FerryTyper(add_completion=False, no_args_is_help=True, help="Ferry: distributed LLM inference.")

# Help text is Rich markup: a literal "[default: ...]" must be escaped, or it is read as a tag and vanishes.
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF file or HF checkpoint folder "
                                                  "\\[default: SmolLM2-135M-Instruct]")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N \\[default: cuda if present]")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="fp32, bf16, fp16 \\[default: bf16; fp32 on a CPU without native "
                                                      "bf16 and for CPU --tp]")]
WeightsOpt = Annotated[str, typer.Option(help="auto (quantized on one CPU rank in bf16, else native), native, int8 "
                                                "or quantized (GGUF 4-bit kept as int4, the rest int8 rows; CPU, bf16)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="log which paths ran and timings to stderr")]


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="ferry: %(name)s: %(message)s"
    )


def run_guarded(fn) -> None:
    try:
        fn()
    except FerryError as exc:
        err(f"ferry: error: {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err("ferry: interrupted")
        raise typer.Exit(130) from None


MaxTokensOpt = Annotated[int, typer.Option(help="tokens to generate per prompt at most")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy")]
TopPOpt = Annotated[float, typer.Option()]
TopKOpt = Annotated[int, typer.Option(help="0 = off")]
SeedOpt = Annotated[Optional[int], typer.Option(help="same seed, same text")]
StopOpt = Annotated[Optional[list[str]], typer.Option(help="stop string (repeatable)")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="wrap each prompt in the model's chat template")]
StreamOpt = Annotated[bool, typer.Option("--stream", help="print tokens as they are produced")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print exactly one JSON object on stdout")]
CompileOpt = Annotated[Optional[bool], typer.Option(
    "--compile/--no-compile", help="CPU: run decode through one torch.compile'd step (inductor C++; compiled once per "
    "machine, cached; on by default in chat and serve, off for one-shot generate). CUDA: refused by the serving "
    "engine for now (its compiled paged step measured 8x slower than CUDA graphs alone; the error says why)",
    show_default=False)]
KvMemoryOpt = Annotated[Optional[str], typer.Option(
    "--kv-memory", help="KV cache: a fraction of the GPU memory free after loading (0.85) or a size (6GiB) "
    "\\[default: 0.85 on GPU, 1GiB on CPU]", show_default=False)]
CompileModeOpt = Annotated[Optional[str], typer.Option(help="torch.compile mode instead of Ferry's "
                                                       "(max-autotune-no-cudagraphs), e.g. default")]
TpOpt = Annotated[int, typer.Option("--tp", help="tensor-parallel ranks (one per GPU; gloo processes on CPU)")]
TpUnsetOpt = Annotated[Optional[int], typer.Option("--tp", help="tensor-parallel ranks (one per GPU; gloo processes on "
                                                  "CPU; under torchrun: the ranks of a node by default) "
                                                  "\\[default: 1]")]
PpOpt = Annotated[Optional[int], typer.Option("--pp", help="pipeline stages of contiguous layers (under torchrun: "
                                               "one per node by default) \\[default: 1]")]
LayerSplitOpt = Annotated[Optional[str], typer.Option("--layer-split", help="layers per pipeline stage, e.g. "
                                                      "10,10,12 \\[default: even]")]
StagesOpt = Annotated[Optional[str], typer.Option("--stages", help="where each pipeline stage runs, with its "
                                                  "layers: cuda:0=24,cpu=6, or cuda:0,cpu to size them by measured "
                                                  "speed, or a placement JSON file (TP stages, threads, shares)",
                                                  show_default=False)]
TpSharesOpt = Annotated[Optional[str], typer.Option("--tp-shares", help="uneven tensor parallelism for ranks of "
                                                    "unequal speed: each rank's share of heads and FFN columns, "
                                                    "e.g. 2,1, or 'auto' (measured)", show_default=False)]
MicroBatchesOpt = Annotated[Optional[int], typer.Option("--micro-batches", help="micro-batches flowing through the "
                                                        "pipeline \\[default: --pp]")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="seconds any collective, stage message or rank may "
                                           "stay silent before the run stops with the rank named")]
AllReduceOpt = Annotated[str, typer.Option(help="TP all-reduce path: auto (fastest per size, calibrated once per "
                                           "machine) or process_group / symm_one_shot / symm_two_shot / "
                                           "ferry_one_shot; add ,fused or ,unfused to force the one-kernel "
                                           "all-reduce + residual add + RMSNorm on or off (auto: where faster)")]
CompressedAllReduceOpt = Annotated[Optional[str], typer.Option(help="'int8': lossy all-reduce of the TP layer "
                                                               "outputs (per-token scales); off by default")]


def completion_json(prompt: str, c, **extra) -> dict:
    return {
        "prompt": prompt,
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "ttft_s": round(c.ttft_s, 6),
        "tokens_per_s": round(c.tokens_per_s, 3),
        **extra,
    }


def print_completions(completions) -> None:
    """Each completion's text on stdout; with several, each tagged with its prompt's index."""
    for i, c in enumerate(completions):
        print(f"[{i}] {c.text}" if len(completions) > 1 else c.text, flush=True)


def summary_line(completions) -> str:
    total = sum(len(c.token_ids) for c in completions)
    ttft = max(c.ttft_s for c in completions)
    rate = sum(c.tokens_per_s for c in completions)
    return f"ferry: {total} tokens generated, time to first token {ttft * 1000:.0f} ms, {rate:.1f} tokens/s"


class StreamPrinter:
    """Prints token text as it arrives; with several prompts, each run of text is tagged with its prompt."""

    def __init__(self, out, count: int) -> None:
        self.out, self.count, self.current = out, count, None

    def write(self, index: int, text: str) -> None:
        if not text:
            return
        if self.count > 1 and index != self.current:
            self.out.write(("\n" if self.current is not None else "") + f"[{index}] ")
            self.current = index
        self.out.write(text)
        self.out.flush()

    def __call__(self, event) -> None:
        self.write(event.index, event.text)

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()
