"""``veil controller run`` serves Prometheus metrics next to its health endpoint.

A real controller on loopback (kernel-chosen ports), a real node joining with a
token, a real certificate issued over mutual TLS and a real refusal (node-scoped
issuance); then a plain HTTP scrape of ``/metrics`` must show each of them.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.api.errors import ApiError
from controller.api.spiffe import SpiffeId
from node import request_certificate

from .conftest import start_controller

CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"  # runs on node-a
PAYMENTS = "spiffe://cluster.local/ns/shop/sa/payments"  # runs on node-b only

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        content_type = resp.headers["Content-Type"]
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return content_type, out


def health_port(log: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"health endpoint on http://127\.0\.0\.1:(\d+)/", log.read_text())
        if m:
            return int(m[1])
        time.sleep(0.05)
    raise AssertionError(f"no health endpoint line in {log}:\n{log.read_text()[-2000:]}")


@pytest.mark.timeout(60)
async def test_metrics_count_an_issued_certificate_and_a_refusal(tmp_path: Path) -> None:
    ctrl = start_controller(tmp_path, "--health-addr", "127.0.0.1:0")
    try:
        port = health_port(ctrl.log_path)
        _, before = scrape(port)
        assert before[("veil_controller_ready", ())] == 1
        assert before[("veil_controller_phase", (("phase", "serving"),))] == 1
        generation = before[("veil_controller_registry_generation", ())]
        assert generation >= 1
        assert before[("veil_controller_registry_objects", (("kind", "workload"),))] > 0

        node_a = await ctrl.join("node-a")
        await request_certificate(node_a, SpiffeId.parse(CHECKOUT))
        with pytest.raises(ApiError) as refused:
            await request_certificate(node_a, SpiffeId.parse(PAYMENTS))
        assert refused.value.code == "PERMISSION_DENIED"

        content_type, after = scrape(port)
        assert content_type.startswith("text/plain")
        issued = "veil_controller_certificates_issued_total"
        assert after[(issued, (("kind", "join"),))] == 1
        assert after[(issued, (("kind", "workload"),))] == 1
        refusals = "veil_controller_certificate_refusals_total"
        key = (("operation", "certificate"), ("reason", "not_scheduled"))
        assert after[(refusals, key)] == 1
        assert after[("veil_controller_registry_error", ())] == 0
        assert after[("veil_controller_ca_expiry_timestamp_seconds", ())] > time.time()
        # No node name or identity became a label.
        assert not [labels for _, labels in after if any("node-a" in v for _, v in labels)]

        # A broken registry edit is refused; the previous state keeps serving
        # and the error shows until the file is fixed.
        ctrl.write_registry("workloads: [[[")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            _, now = scrape(port)
            if now[("veil_controller_registry_error", ())] == 1:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the registry error never showed in /metrics")
        assert now[("veil_controller_registry_last_error_timestamp_seconds", ())] > 0
        assert now[("veil_controller_registry_generation", ())] == generation
    finally:
        ctrl.stop()
