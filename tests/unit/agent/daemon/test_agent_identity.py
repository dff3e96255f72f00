"""Node certificate renewal timing and the sock_diag mark decoding (pure parts)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import pytest

from agent.daemon.identity import renewal_due
from agent.daemon.netinfo import _mark

T0 = datetime(2030, 1, 1, tzinfo=UTC)
DAY = timedelta(hours=24)


@pytest.mark.parametrize(
    ("elapsed", "due"),
    [
        (timedelta(0), False),
        (timedelta(hours=11, minutes=59), False),
        (timedelta(hours=12), True),
        (DAY + timedelta(hours=1), True),
    ],
)
def test_renewal_at_half_life(elapsed: timedelta, due: bool) -> None:
    result = renewal_due(T0, T0 + DAY, T0 + elapsed)
    assert (result is not None) is due
    if due:
        assert result == T0 + timedelta(hours=12)


def test_renewal_fraction() -> None:
    assert renewal_due(T0, T0 + DAY, T0 + timedelta(hours=15), fraction=2 / 3) is None
    assert renewal_due(T0, T0 + DAY, T0 + timedelta(hours=16), fraction=2 / 3) is not None


@pytest.mark.skipif(sys.byteorder != "little", reason="sock_diag reports the mark in host order")
def test_diag_mark_decoding() -> None:
    assert _mark("00:02:00:00") == 0x200
    assert _mark("00:12:00:00") == 0x1200
    assert _mark(0x200) == 0x200
    assert _mark("zz") is None
    assert _mark(None) is None
