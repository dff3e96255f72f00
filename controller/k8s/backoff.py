"""Exponential backoff with jitter, as a value the IO loops consult.

Reflectors, the leader elector and the status writer retry the API server with
the same policy: start small, double up to a cap, add jitter so a fleet of
controllers that lost the API server together does not return in lockstep, and
reset after a success.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(slots=True)
class Backoff:
    initial: float = 0.8
    cap: float = 30.0
    jitter: float = 0.2  # +/- fraction of the delay
    _attempt: int = field(default=0, init=False)
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the base up to ``cap``."""
        base = min(self.cap, self.initial * float(1 << min(self._attempt, 32)))
        self._attempt += 1
        spread = base * self.jitter
        return max(0.0, base + self._rng.uniform(-spread, spread))

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt
