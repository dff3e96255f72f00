"""The pure parts of the same-node splice: when a half-close may be forwarded,
how often it is checked, and the fallback when the agent's pins are absent."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ztunnel.proxy.splice import Drain, SameNodeSplice, drain_decision, poll_delay


@pytest.mark.parametrize(
    ("redirected", "acked", "queued", "expected"),
    [
        (0, 0, 0, Drain.FORWARD_FIN),  # nothing was carried: forward at once
        (10, 0, 0, Drain.WAIT),  # all 10 bytes still between the sockets
        (10, 0, 10, Drain.FORWARD_FIN),  # all in the peer's send queue
        (10, 4, 6, Drain.FORWARD_FIN),  # some acknowledged, the rest queued
        (10, 4, 5, Drain.WAIT),  # one byte not yet in the send queue: the tail
        (10, 10, 0, Drain.FORWARD_FIN),  # all acknowledged
        (8 << 20, (8 << 20) - 1, 0, Drain.WAIT),  # the last byte of a bulk transfer
        (5, 6, 0, Drain.FORWARD_FIN),  # more sent than counted cannot hide a tail
    ],
)
def test_drain_decision(redirected: int, acked: int, queued: int, expected: Drain) -> None:
    assert drain_decision(redirected, acked, queued) is expected


def test_poll_delay_grows_and_is_capped() -> None:
    delays = [poll_delay(n) for n in range(30)]
    assert delays[0] == pytest.approx(0.0002)
    assert delays == sorted(delays)
    assert max(delays) == pytest.approx(0.02)


def test_missing_pins_warn_once_and_fall_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    splice = SameNodeSplice(tmp_path / "no-pins")
    with caplog.at_level(logging.WARNING, logger="veil.ztunnel.proxy"):
        assert splice.maps() is None
        assert splice.maps() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Python relay" in warnings[0] and f"--pin-dir {tmp_path / 'no-pins'}" in warnings[0]


def test_no_pin_dir_means_no_fast_path_and_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert SameNodeSplice(None).maps() is None
    assert not caplog.records
