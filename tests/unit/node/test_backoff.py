"""Backoff: exponential, capped, jittered, resettable."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.watch import Backoff


def test_doubles_up_to_the_cap_without_jitter() -> None:
    b = Backoff(0.5, 4.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.attempts == 6
    b.reset()
    assert b.next() == 0.5


@given(
    st.floats(0.01, 5),
    st.floats(5, 120),
    st.floats(0, 1),
    st.integers(0, 2**32),
    st.integers(1, 80),
)
def test_delays_stay_within_bounds(
    initial: float, cap: float, jitter: float, seed: int, n: int
) -> None:
    b = Backoff(initial, cap, jitter=jitter, rng=random.Random(seed))
    for i in range(n):
        ceiling = min(cap, initial * 2**i)
        d = b.next()
        assert ceiling * (1 - jitter) - 1e-9 <= d <= ceiling + 1e-9


def test_jitter_spreads_delays() -> None:
    delays = {Backoff(1, 10, rng=random.Random(s)).next() for s in range(20)}
    assert len(delays) > 10


@pytest.mark.parametrize(
    "kw",
    [
        {"initial": 0, "maximum": 1},
        {"initial": 2, "maximum": 1},
        {"initial": 1, "maximum": 2, "jitter": 2},
    ],
)
def test_rejects_bad_parameters(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kw)  # type: ignore[arg-type]
