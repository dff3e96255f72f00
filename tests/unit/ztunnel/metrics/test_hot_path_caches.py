"""The per-connection shortcuts keep their answers: the access log writer thread,
the memoised metric labels, the counters' known-series path, the IP memo."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from controller.api.model import Labels, Workload
from ztunnel.hbone.connect import BadAuthority, normalize_ip, parse_authority
from ztunnel.metrics.access_sink import AccessLogSink
from ztunnel.metrics.prometheus import Counter
from ztunnel.metrics.traffic import (
    ConnectionLabels,
    ConnectionReport,
    Reporter,
    access_log_line,
    write_access_log,
)


def _workload(name: str, app: str) -> Workload:
    return Workload(name, "shop", "sa", "node-a", ("10.0.0.1",), Labels({"app": app}))


class _SlowStream(io.StringIO):
    """Holds the writer thread inside write() until released, so lines queue up."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writes = 0

    def write(self, s: str) -> int:
        self.release.wait(5)
        self.writes += 1
        return super().write(s)


def test_sink_writes_every_line_in_order_and_batches_them() -> None:
    stream = _SlowStream()
    sink = AccessLogSink(stream)
    sink.start()
    for i in range(300):
        assert sink.offer(f"line {i}")
    stream.release.set()
    sink.stop()
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(300)]
    assert stream.writes < 300  # queued lines went out together


def test_sink_refuses_the_shortcut_when_a_record_must_be_seen() -> None:
    sink = AccessLogSink(io.StringIO())
    sink.setLevel(logging.WARNING)
    assert not sink.offer("x")
    sink.setLevel(logging.NOTSET)
    sink.addFilter(lambda record: True)
    assert not sink.offer("x")


def test_write_access_log_through_the_sink_and_through_other_handlers() -> None:
    logger = logging.getLogger("veil.access")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    report = ConnectionReport(Reporter.SOURCE, ("10.0.0.1", 5000), ("10.0.0.2", 80))
    try:
        logger.setLevel(logging.INFO)
        logger.propagate = False
        stream = io.StringIO()
        sink = AccessLogSink(stream)
        logger.handlers = [sink]
        sink.start()
        write_access_log(report)
        sink.stop()
        line = json.loads(stream.getvalue())
        assert line["event"] == "connection_closed" and line["src"] == "10.0.0.1:5000"
        assert line["time"].endswith("Z") and len(line["time"]) == len(
            "2026-01-01T00:00:00.000000Z"
        )

        # Any other set-up gets an ordinary record.
        seen: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record)

        logger.handlers = [Keep()]
        write_access_log(report)
        assert len(seen) == 1 and json.loads(seen[0].getMessage())["dst"] == "10.0.0.2:80"
    finally:
        logger.handlers, logger.propagate, logger.level = saved[0], saved[1], saved[2]


def test_access_log_time_is_rfc3339_utc_for_a_given_instant() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=UTC)
    report = ConnectionReport(Reporter.SOURCE, None, None)
    assert json.loads(access_log_line(report, at))["time"] == "2026-03-04T05:06:07.000089Z"


def test_memoised_labels_follow_the_objects_they_were_derived_from() -> None:
    first = _workload("pay-0", "payments")
    again = ConnectionLabels.of(Reporter.SOURCE, first, None, None, None)
    assert ConnectionLabels.of(Reporter.SOURCE, first, None, None, None) is again
    assert again.source_app == "payments"
    # A new snapshot's object with other labels (possibly at a recycled
    # address once the old one is gone) gets labels of its own.
    del first
    replaced = _workload("pay-0", "billing")
    assert ConnectionLabels.of(Reporter.SOURCE, replaced, None, None, None).source_app == "billing"
    flagged = ConnectionLabels.of(Reporter.SOURCE, replaced, None, None, None, "RBAC")
    assert flagged.response_flags == "RBAC"
    assert ConnectionLabels.of(Reporter.DESTINATION, replaced, None, None, None).reporter is (
        Reporter.DESTINATION
    )


def test_counter_known_series_path_keeps_validation_and_truncation() -> None:
    c = Counter("c_total", "help", ("a", "b"))
    c.inc(("x", "y"))
    c.inc(("x", "y"))
    assert c.value(("x", "y")) == 2
    with pytest.raises(ValueError):
        c.inc(("x",))
    long = "v" * 400
    c.inc(("x", long))
    c.inc(("x", long))
    assert c.value(("x", long)) == 2 and all(len(k[1]) <= 256 for k in c.series())


def test_ip_memo_keeps_answers_and_errors() -> None:
    assert normalize_ip("::ffff:10.0.0.5") == "10.0.0.5"
    assert normalize_ip("::ffff:10.0.0.5") == "10.0.0.5"
    assert parse_authority("[fd00:0:0::5]:80") == ("fd00::5", 80)
    for bad in ("10.0.0.300", "fe80::1%eth0", "host"):
        for _ in range(2):
            with pytest.raises(BadAuthority):
                normalize_ip(bad)
