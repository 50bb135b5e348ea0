"""One sequence's state across steps: its tokens, its incrementally decoded text, why it finished."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ferry.model.tokenizer import FerryTokenizer


def stop_token_ids(params, tokenizer: FerryTokenizer | None) -> frozenset[int]:
    """The token ids that end a sequence for these sampling parameters (none with ignore_eos or no tokenizer)."""
    if params.ignore_eos or tokenizer is None:
        return frozenset()
    return frozenset(tokenizer.eos_token_ids)


@dataclass
class Sequence:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Incremental detokenization: only output_ids[_prefix_offset:] is decoded each step, so a token costs the
    # same at position 10 and 10,000 (decoding everything each step made long generations quadratic).
    # [_prefix_offset, _read_offset) is already-emitted context that keeps spacing/merges right at the seam.
    _prefix_offset: int = 0
    _read_offset: int = 0
    _emitted: int = 0  # characters of `text` already returned; a possible stop-string start is held back

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def next_position(self) -> int:
        """Position of the newest token (the one the next decode step feeds in)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def append(
        self, token_id: int, tokenizer: FerryTokenizer | None, eos_ids: frozenset[int], stop: tuple[str, ...], max_tokens: int
    ) -> str:
        """Record a sampled token; returns the text it added (held back while a UTF-8 character is incomplete)."""
        now = time.perf_counter()
        self.first_token_time = self.first_token_time or now
        self.last_token_time = now
        self.output_ids.append(token_id)
        if token_id in eos_ids:
            self.finish_reason = "stop"
            return self._emit(len(self.text))
        if tokenizer is None:  # token-ids-only mode (benchmarks with random weights)
            if len(self.output_ids) >= max_tokens:
                self.finish_reason = "length"
            return ""
        window = self.output_ids[self._prefix_offset :]
        decoded = tokenizer.decode(window)
        if decoded.endswith("\ufffd"):  # an incomplete UTF-8 character ...
            if len(self.output_ids) < max_tokens:
                return ""  # ... waits for its remaining bytes
            # ... cut by the token limit never gets them: its bytes are dropped rather than shown as U+FFFD.
            # (The already-read part of the window ended complete, so this strips only the unread tail.)
            decoded = decoded.rstrip("\ufffd")
        seen = self._read_offset - self._prefix_offset
        delta = decoded[len(tokenizer.decode(window[:seen])) :] if seen else decoded
        self._prefix_offset, self._read_offset = self._read_offset, len(self.output_ids)
        # A stop string can only end inside the new text, and start at most (its length - 1) characters before.
        search_from = max(0, len(self.text) - max((len(s) for s in stop), default=1) + 1)
        self.text += delta
        hits = [(i, s) for s in stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)[0]]
            self.finish_reason = "stop"
        elif len(self.output_ids) >= max_tokens:
            self.finish_reason = "length"
        else:
            return self._emit(len(self.text) - _stop_prefix_suffix(self.text, stop))
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        out = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out


def _stop_prefix_suffix(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string: streaming holds it back, since the
    next tokens may complete the stop string and text already sent cannot be taken back."""
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held
