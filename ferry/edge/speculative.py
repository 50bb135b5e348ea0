"""Edge-draft / cloud-verify: the edge proposes gamma tokens with a cheap copy of the model, the cloud checks them
all in one forward, and one round trip yields up to gamma + 1 tokens instead of one.

Over a 50 ms link a plain split step costs at least one RTT per token; a round costs one RTT plus gamma draft
steps on the edge, so gamma is chosen each round from the measured acceptance rate, RTT and draft step time.
"""

from __future__ import annotations

import logging
import time

import torch

from ferry.engine.sequence_runner import SequenceRunner
from ferry.model.loader import LoadedModel

log = logging.getLogger("ferry.edge")


class Drafter:
    """The draft model (any model with the same tokenizer) with its own KV cache over the sequence."""

    def __init__(self, loaded: LoadedModel, compile: bool | None = None) -> None:
        """`compile`: draft steps through the compiled CPU step (None: unless FERRY_COMPILE=0); compiled here."""
        self.loaded = loaded
        self.device = loaded.model.norm.weight.device
        self.runner = SequenceRunner(loaded.model, None, compile)
        log.info("draft model: %s", self.runner.path)
        self.runner.warm_up()
        self.fed = 0  # tokens of the sequence whose K/V the cache holds (positions 0..fed-1)

    def reset(self) -> None:
        self.fed = 0

    def _feed(self, ids: list[int], start: int) -> int:
        return int(self.runner.run(torch.tensor(ids, device=self.device), start).argmax(dim=-1)[0])

    def catch_up(self, sequence: list[int]) -> None:
        """Feed all but the last unseen token (after plain steps, many are unseen), so that `draft` times only
        the steady-state cost of a round."""
        if len(sequence) - self.fed > 1:
            self._feed(sequence[self.fed : -1], self.fed)
            self.fed = len(sequence) - 1

    def draft(self, sequence: list[int], gamma: int) -> list[int]:
        """Greedy continuation of `sequence` by `gamma` tokens (feeds what it has not seen yet first)."""
        token = self._feed(sequence[self.fed :], self.fed)
        drafted = [token]
        for i in range(gamma - 1):
            drafted.append(self._feed([drafted[-1]], len(sequence) + i))
        self.fed = len(sequence) + gamma - 1
        return drafted

    def rollback(self, valid: int) -> None:
        """Forget K/V past the first `valid` tokens (rejected drafts); later feeds overwrite them."""
        self.fed = min(self.fed, valid)


class GammaController:
    """Picks gamma to maximise expected tokens per second, or 0 (a plain step) while drafting does not pay.

    With per-token acceptance a, a round with gamma drafts yields E(gamma) = (1 - a^(gamma+1)) / (1 - a) tokens on
    average. It costs what a plain step costs (edge layers, RTT, cloud forward and head) plus, per drafted token,
    one draft step and the extra edge and cloud work of one more position (its LM head included):

        gain(gamma) = E(gamma) * plain / (plain + gamma * (draft_step + per_draft))

    is the expected speed of rounds relative to plain steps. When the best gamma's gain is below 1 (a draft that
    is rarely accepted, draft steps or verify positions that cost more than the round trips they save), drafting
    pauses for `pause` plain steps; then one round probes again, since acceptance and costs change with the text
    and the link. A probe that still loses doubles the pause (up to `max_pause`); one that wins resumes drafting.

    Nothing is guessed: the first decode step is a plain one (it measures `plain`), the first round drafts
    `first_gamma` tokens and its measurements (acceptance included) replace the unknowns outright; later ones are
    smoothed in. A draft that does not pay therefore costs one short round before the controller knows.
    """

    def __init__(self, gamma_max: int = 8, smoothing: float = 0.3, pause: int = 8, max_pause: int = 64,
                 first_gamma: int = 2) -> None:
        self.gamma_max, self.smoothing = gamma_max, smoothing
        self.first_gamma = min(first_gamma, gamma_max)
        self.acceptance: float | None = None  # per drafted token
        self.plain_step_s: float | None = None  # one plain decode step, measured
        self.draft_step_s: float | None = None  # one draft token, measured
        self.per_draft_s: float | None = None  # a round's cost over a plain step's, per drafted token, measured
        self.pause, self.max_pause = pause, max_pause
        self._next_pause = pause
        self._plain_left = 0  # plain steps before the next probe round

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def expected_tokens(self, gamma: int) -> float:
        a = min(self.acceptance or 0.0, 0.99)
        return (1 - a ** (gamma + 1)) / (1 - a)

    def gain(self, gamma: int) -> float:
        """Expected tokens per second of rounds with `gamma` drafts, relative to plain steps (after a round)."""
        assert self.plain_step_s is not None and self.draft_step_s is not None and self.per_draft_s is not None
        per_token = self.draft_step_s + self.per_draft_s
        return self.expected_tokens(gamma) * self.plain_step_s / (self.plain_step_s + gamma * per_token)

    def best_gamma(self) -> int:
        return max(range(1, self.gamma_max + 1), key=self.gain)

    @property
    def paused(self) -> bool:
        return self._plain_left > 0

    def choose(self) -> int:
        """gamma for the next round; 0: take a plain step (and report its time with `plain_step`)."""
        if self.plain_step_s is None:
            return 0  # measure what drafting has to beat
        if self.draft_step_s is None:
            return self.first_gamma  # a short round measures what rounds cost here
        return 0 if self.paused else self.best_gamma()

    def update(self, gamma: int, accepted: int, overhead_s: float, draft_s: float) -> None:
        """After a round (`overhead_s`: all of it but the drafting): fold in what it measured, then pause drafting
        if it is not expected to pay."""
        # Per-token acceptance estimated from the accepted prefix length of this round.
        self.acceptance = self._smooth(self.acceptance, accepted / gamma if accepted < gamma else 1.0)
        self.draft_step_s = self._smooth(self.draft_step_s, draft_s / gamma)
        plain = self.plain_step_s if self.plain_step_s is not None else overhead_s
        self.per_draft_s = self._smooth(self.per_draft_s, max(0.0, overhead_s - plain) / gamma)
        if self.plain_step_s is None:
            self.plain_step_s = overhead_s  # no plain step seen: a round's overhead is the closest measure
        best = self.best_gamma()
        if self.gain(best) < 1:
            log.info("drafting paused for %d steps: expected gain %.2f (acceptance %.2f)", self._next_pause,
                     self.gain(best), self.acceptance)
            self._plain_left = self._next_pause
            self._next_pause = min(2 * self._next_pause, self.max_pause)
        else:
            self._next_pause = self.pause

    def plain_step(self, seconds: float) -> None:
        """A plain step taken on the controller's word: its time is what drafting has to beat."""
        self.plain_step_s = self._smooth(self.plain_step_s, seconds)
        self._plain_left = max(0, self._plain_left - 1)


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started
