"""Capped exponential backoff with jitter, for everything that retries the controller.

Sans-IO: :meth:`Backoff.next` returns the delay and the caller sleeps, so tests
check the sequence without waiting. Jitter is "equal jitter": each delay is
drawn uniformly from ``[d * (1 - jitter), d]`` where ``d`` doubles up to the
cap. Nodes that lost the controller together therefore spread out when they
come back instead of reconnecting in lockstep, while no delay exceeds the cap.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        *,
        multiplier: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff needs 0 < initial ({initial}) <= maximum ({maximum})")
        if multiplier < 1 or not 0 <= jitter <= 1:
            raise ValueError("backoff needs multiplier >= 1 and 0 <= jitter <= 1")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

    @property
    def attempts(self) -> int:
        """Failures since the last :meth:`reset`."""
        return self._attempt

    def next(self) -> float:
        """The delay before the next attempt (and counts one failure)."""
        ceiling = min(self.maximum, self.initial * self.multiplier**self._attempt)
        self._attempt = min(self._attempt + 1, 64)  # 2**64 * initial is past any cap
        return ceiling * (1 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """After a success: the next failure starts from ``initial`` again."""
        self._attempt = 0
