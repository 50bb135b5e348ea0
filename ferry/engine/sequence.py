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
            return ""
        if tokenizer is None:  # token-ids-only mode (benchmarks with random weights)
            if len(self.output_ids) >= max_tokens:
                self.finish_reason = "length"
            return ""
        decoded = tokenizer.decode(self.output_ids)
        if decoded.endswith("\ufffd") and len(self.output_ids) < max_tokens:
            return ""
        delta = decoded[len(self.text) :]
        self.text = decoded
        hits = [(self.text.find(s), s) for s in stop if s in self.text]
        if hits:
            cut = min(hits)[0]
            delta = delta[: max(0, len(delta) - (len(self.text) - cut))]
            self.text = self.text[:cut]
            self.finish_reason = "stop"
        elif len(self.output_ids) >= max_tokens:
            self.finish_reason = "length"
        return delta
