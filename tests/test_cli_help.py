"""`ferry ... --help` reads as people type the command, and reports spell dtypes as the CLI takes them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ferry.device import DTYPES, dtype_name, resolve_dtype


def help_text(*command: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "ferry.cli", *command, "--help"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize(
    "command, usage",
    [
        ((), "Usage: ferry [OPTIONS] COMMAND [ARGS]..."),
        (("generate",), "Usage: ferry generate [OPTIONS] PROMPTS..."),
        (("chat",), "Usage: ferry chat [OPTIONS]"),
        (("edge",), "Usage: ferry edge [OPTIONS] PROMPTS..."),
        (("bench", "edge"), "Usage: ferry bench edge [OPTIONS]"),
    ],
)
def test_help_has_a_plain_usage_line_and_no_bool_value_on_flags(command, usage):
    text = help_text(*command)
    assert usage in text, text
    assert "<bool>" not in text, text
    assert "{" not in text, text  # Typer's `{prompts}...` for a required argument


def test_generate_help_shows_the_defaults_written_in_option_help():
    text = help_text("generate")
    for default in ("[default: SmolLM2-135M-Instruct]", "[default: cuda if present]", "[default: bf16; fp32"):
        assert default in text, text  # Rich markup would swallow an unescaped "[default: ...]"


@pytest.mark.parametrize("dtype, name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_dtype_name_is_the_cli_spelling_and_resolves_back(dtype, name):
    assert dtype_name(dtype) == name
    assert name in DTYPES and resolve_dtype(name, torch.device("cpu")) == dtype
