"""Tokenizers from a GGUF file's metadata or a checkpoint folder's tokenizer.json, both on `tokenizers`.

Byte-level BPE vocabularies (SmolLM, Llama 3, Qwen2, GPT-2 style) are rebuilt from the GGUF token list and
merges, with the pre-tokenizer split that the file's `tokenizer.ggml.pre` names.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ferry.errors import InvalidRequestError, UnsupportedModelError
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
# Bytes that were not UTF-8 reach Python as lone surrogates U+DC80..U+DCFF ("surrogateescape": command-line
# arguments, file names, stdin read that way). Any other lone surrogate is not text at all.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")
_OTHER_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte 0..255 in a byte-level BPE vocabulary
    (printable Latin-1 bytes stand for themselves, the rest are moved up past U+0100 in order)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    chars, moved = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + moved))
            moved += 1
    return chars


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
        ids = self._encode_text(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def _encode_text(self, text: str) -> list[int]:
        """Token ids of `text`; bytes that were not UTF-8 (surrogate-escaped) become their byte tokens, which any
        byte-level (or byte-fallback) vocabulary has, so a prompt from any bytes can be run."""
        if not _ESCAPED_BYTES.search(text):
            if bad := _OTHER_SURROGATE.search(text):
                raise InvalidRequestError(
                    f"the prompt holds a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}, which is "
                    "not text (is it half of a split surrogate pair?); pass valid Unicode"
                )
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        ids, start = [], 0
        for run in _ESCAPED_BYTES.finditer(text):
            ids += self._encode_text(text[start : run.start()])
            ids += [self._byte_token(ord(c) - 0xDC00, run.start() + i) for i, c in enumerate(run.group())]
            start = run.end()
        return ids + self._encode_text(text[start:])

    def _byte_token(self, byte: int, where: int) -> int:
        token = self._byte_tokens[byte]
        if token is None:
            # Byte-level vocabularies may leave out bytes that UTF-8 never uses (SmolLM2 has no 0xC0, 0xC1,
            # 0xF5..0xFF): such a byte has no meaning to the model, so it is refused rather than dropped.
            raise InvalidRequestError(
                f"the prompt holds byte 0x{byte:02X} (at character {where}), which is not UTF-8, and this model's "
                "vocabulary has no token for that byte; pass the prompt as valid UTF-8"
            )
        return token

    @cached_property
    def _byte_tokens(self) -> list[int | None]:
        """Each byte's token id: `<0xXX>` in a byte-fallback vocabulary, the byte's character in a byte-level one."""
        fallback = [self.tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        if all(t is not None for t in fallback):
            return fallback
        pre = json.loads(self.tokenizer.to_str()).get("pre_tokenizer")
        if "ByteLevel" not in json.dumps(pre):
            return [None] * 256
        return [self.tokenizer.token_to_id(c) for c in byte_level_alphabet()]

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
        if (template_file := folder / "chat_template.jinja").exists():
            # Where transformers (>= 4.50) saves the template; like transformers, the file wins over the config.
            template = template_file.read_text(encoding="utf-8")
        return cls(
            tok,
            bos_token_id=bos if bos is not None else config_bos,
            eos_token_ids=tuple(sorted(eos_ids)),
            add_bos=bool(cfg.get("add_bos_token", False)),
            chat_template=template,
        )
