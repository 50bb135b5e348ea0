"""A Hugging Face folder as today's transformers writes it with `save_pretrained`: the chat template in
`chat_template.jinja` (not in tokenizer_config.json), and a config.json without `architectures` when it was
saved from a config alone (its `model_type` names the family)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ferry.errors import UnsupportedModelError
from ferry.model.config import ModelConfig
from ferry.model.loader import load_model
from ferry.model.tokenizer import FerryTokenizer

transformers = pytest.importorskip("transformers", reason="the folder is written by transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 64
# Words of the WordLevel vocabulary ("w0" ... "w63"); the template writes BOS, a role word and the content.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ 'w3' if m.role == 'user' else 'w4' }} {{ m.content }} "
            "{% endfor %}{% if add_generation_prompt %}w4{% endif %}")
MESSAGES = [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w12"},
            {"role": "user", "content": "w13"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny random Llama saved by transformers, its config re-saved from the config alone, a tokenizer beside."""
    path = tmp_path_factory.mktemp("hf_llama")
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # transformers' init is tiny: weights big enough for well-separated logits
        for param in model.parameters():
            param.copy_(torch.randn(param.shape) / (param.shape[-1] ** 0.5 if param.dim() > 1 else 1.0))
    model.save_pretrained(path)
    model.config.architectures = None
    model.config.save_pretrained(path)

    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="w1", eos_token="w2")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)

    # What this test is about: the layout transformers writes today.
    assert "architectures" not in json.loads((path / "config.json").read_text())
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    assert (path / "chat_template.jinja").read_text() == TEMPLATE
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    return path


def test_config_without_architectures_is_read_by_its_model_type(folder):
    loaded = load_model(folder, torch.device("cpu"), torch.float32, show_progress=False)
    assert loaded.config.architecture == "llama"
    assert (loaded.config.num_layers, loaded.config.num_kv_heads, loaded.config.vocab_size) == (2, 2, VOCAB)


def test_save_pretrained_folder_generates_as_transformers_does(folder):
    from ferry.engine.engine import Engine
    from ferry.engine.sampling import SamplingParams

    loaded = load_model(folder, torch.device("cpu"), torch.float32, show_progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = [1, 5, 9, 13, 17]
    with torch.inference_mode():
        expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                               max_new_tokens=8, do_sample=False, eos_token_id=None)[0, 5:].tolist()
    [c] = Engine(loaded.model, loaded.tokenizer).generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    assert c.token_ids == expected


def test_chat_template_comes_from_chat_template_jinja_as_transformers_renders_it(folder):
    ferry_tok = FerryTokenizer.from_folder(folder, config_eos=(2,), config_bos=1)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert ferry_tok.chat_template == TEMPLATE
    assert ferry_tok.apply_chat_template(MESSAGES) == hf_tok.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)


def test_chat_template_jinja_wins_over_a_template_in_tokenizer_config(folder, tmp_path):
    """transformers gives the file priority; a folder holding both must render the same in Ferry."""
    copy = Path(shutil.copytree(folder, tmp_path / "both"))
    cfg_path = copy / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": "w5{{ messages[0].content }}"}))
    assert FerryTokenizer.from_folder(copy, config_eos=(2,), config_bos=1).chat_template == TEMPLATE
    assert transformers.AutoTokenizer.from_pretrained(copy).chat_template == TEMPLATE


@pytest.mark.slow
def test_cli_chats_with_a_save_pretrained_folder(folder):
    out = subprocess.run([sys.executable, "-m", "ferry.cli", "generate", "--chat", "w10 w11", "--model", str(folder),
                          "--max-tokens", "3", "--ignore-eos", "--json", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    [c] = json.loads(out.stdout)["completions"]
    assert len(c["token_ids"]) == 3 and c["finish_reason"] == "length"


@pytest.mark.parametrize(
    "cfg, named",
    [
        ({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"}, "LlamaForSequenceClassification"),
        ({"model_type": "gpt_neox"}, "gpt_neox"),
    ],
)
def test_a_model_class_or_type_ferry_does_not_run_is_refused_by_name(cfg, named):
    with pytest.raises(UnsupportedModelError, match=named):
        ModelConfig.from_hf({**cfg, "num_attention_heads": 4, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "vocab_size": VOCAB})
