"""Tokenizers from a GGUF file's metadata or a checkpoint folder's tokenizer.json, both on `tokenizers`.

Byte-level BPE vocabularies (SmolLM, Llama 3, Qwen2, GPT-2 style) are rebuilt from the GGUF token list and
merges, with the pre-tokenizer split that the file's `tokenizer.ggml.pre` names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ferry.errors import UnsupportedModelError
from ferry.model.chat_template import render_chat

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4


def _byte_level_pre_tokenizer(pre: str):
    """The split a GGUF `tokenizer.ggml.pre` value stands for (llama.cpp's names)."""
    if pre in ("llama3", "llama-bpe", "llama-v3", "smaug-bpe"):
        split = _LLAMA3_SPLIT
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        split = _QWEN2_SPLIT
    elif pre == "smollm":
        # SmolLM's vocabulary was learned with every digit a token of its own.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in ("gpt-2", "default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise UnsupportedModelError(f"unsupported GGUF pre-tokenizer {pre!r}")
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


class FerryTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tokenizer.id_to_token(token_id) or "")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        return render_chat(
            self.chat_template,
            messages,
            bos_token=self.token_text(self.bos_token_id),
            eos_token=self.token_text(eos),
            add_generation_prompt=add_generation_prompt,
        )

    def encode_chat(self, prompt: str) -> list[int]:
        """Token ids of `prompt` as one user turn, ready for the assistant's answer."""
        # The template writes the BOS text itself where the model wants one.
        return self.encode(self.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> FerryTokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"GGUF tokenizer type {kind!r} is not supported (Ferry reads byte-level BPE, 'gpt2'); "
                "use the model's Hugging Face folder with tokenizer.json instead"
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _GGUF_CONTROL]
        added = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _GGUF_USER_DEFINED]
        tok.add_special_tokens(specials)
        tok.add_tokens(added)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = {int(eos)} if eos is not None else set()
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            eos_ids.add(int(eot))
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(
            tok,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=tuple(sorted(eos_ids)),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_folder(cls, folder: Path, config_eos: tuple[int, ...], config_bos: int | None) -> FerryTokenizer:
        path = folder / "tokenizer.json"
        if not path.exists():
            raise UnsupportedModelError(f"{folder}: tokenizer.json is missing")
        tok = Tokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

        def token_id(entry: Any) -> int | None:
            text = entry.get("content") if isinstance(entry, dict) else entry
            return tok.token_to_id(text) if text else None

        eos_ids = set(config_eos)
        if (eos := token_id(cfg.get("eos_token"))) is not None:
            eos_ids.add(eos)
        bos = token_id(cfg.get("bos_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            tok,
            bos_token_id=bos if bos is not None else config_bos,
            eos_token_ids=tuple(sorted(eos_ids)),
            add_bos=bool(cfg.get("add_bos_token", False)),
            chat_template=template,
        )
