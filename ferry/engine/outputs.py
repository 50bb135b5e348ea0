"""What the engines hand back: a token event per sampled token, a completion per finished request."""

from __future__ import annotations

from dataclasses import dataclass

from ferry.engine.sequence import Sequence


@dataclass(frozen=True)
class TokenEvent:
    index: int  # the request id (add_request), or which prompt of the batch (generate, stream)
    token_id: int
    text: str  # text this token added
    finish_reason: str | None


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    ttft_s: float
    tokens_per_s: float

    @classmethod
    def from_sequence(cls, seq: Sequence, started: float) -> Completion:
        """`started`: when the request began (time to first token counts from it)."""
        first, last = seq.first_token_time or started, seq.last_token_time or started
        n = len(seq.output_ids)
        return cls(
            prompt_token_ids=seq.prompt_ids,
            token_ids=seq.output_ids,
            text=seq.text,
            finish_reason=seq.finish_reason or "length",
            ttft_s=first - started,
            # Decode rate: tokens after the first over the time after the first.
            tokens_per_s=(n - 1) / (last - first) if n > 1 and last > first else 0.0,
        )
