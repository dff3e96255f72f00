"""The operator's path with real processes: `veil controller run`, `veil controller token
create`, `veil node join`, `veil node certificate` (issued and refused), status and renewal."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support.controller import ControllerProcess

REPO = Path(__file__).resolve().parents[3]

REGISTRY = """\
trustDomain: cluster.local
namespaces:
  - name: shop
    labels: {veil.io/dataplane-mode: ambient}
workloads:
  - name: checkout
    namespace: shop
    serviceAccount: checkout
    node: node-a
    ips: [10.244.1.10]
  - name: payments
    namespace: shop
    serviceAccount: payments
    node: node-b
    ips: [10.244.2.10]
"""
CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"
PAYMENTS = "spiffe://cluster.local/ns/shop/sa/payments"


@pytest.fixture
def running_controller(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`veil controller run` on ephemeral loopback ports; its startup line gives the addresses."""
    ctrl = ControllerProcess(
        tmp_path,
        REGISTRY,
        log_level="warning",
        registry_poll=None,
        state_path=tmp_path / "controller",
    ).start()
    try:
        yield {
            "state": ctrl.state_dir,
            "mtls": ctrl.mtls,
            "join": ctrl.join_addr,
            "proc": ctrl.proc,
        }
    finally:
        ctrl.stop()


def test_token_join_certificate_and_refusal(
    running_controller: dict[str, Any], veil_cli: Any, tmp_path: Path
) -> None:
    ctl = running_controller
    node_dir = tmp_path / "node-a"

    res = veil_cli(
        [
            "controller",
            "token",
            "create",
            "--node",
            "node-a",
            "--ttl",
            "10m",
            "--state-dir",
            str(ctl["state"]),
        ]
    )
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert token.startswith("veil1.") and "node-a" in res.stderr

    # The token travels in the environment, not on the command line.
    res = veil_cli(
        [
            "node",
            "join",
            "--controller",
            ctl["join"],
            "--controller-mtls",
            ctl["mtls"],
            "--node",
            "node-a",
            "--state-dir",
            str(node_dir),
        ],
        env={"VEIL_JOIN_TOKEN": token},
    )
    assert res.returncode == 0, res.stderr
    assert "spiffe://cluster.local/veil/node/node-a" in res.stderr
    assert stat.S_IMODE((node_dir / "node-key.pem").stat().st_mode) == 0o600

    key_out = tmp_path / "checkout-key.pem"
    res = veil_cli(
        [
            "node",
            "certificate",
            "--state-dir",
            str(node_dir),
            "--identity",
            CHECKOUT,
            "--ttl",
            "1h",
            "--key-out",
            str(key_out),
        ]
    )
    assert res.returncode == 0, res.stderr
    chain = x509.load_pem_x509_certificates(res.stdout.encode())
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [CHECKOUT]
    assert stat.S_IMODE(key_out.stat().st_mode) == 0o600
    (tmp_path / "leaf.pem").write_text(res.stdout)
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(node_dir / "bundle.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # Refused: payments runs on node-b. Exit 1 with the controller's reason, nothing on stdout.
    res = veil_cli(["node", "certificate", "--state-dir", str(node_dir), "--identity", PAYMENTS])
    assert res.returncode == 1
    assert res.stdout == ""
    assert "PERMISSION_DENIED" in res.stderr and "'node-a'" in res.stderr and PAYMENTS in res.stderr

    # Refused: the token was single use.
    res = veil_cli(
        [
            "node",
            "join",
            "--controller",
            ctl["join"],
            "--token",
            token,
            "--node",
            "node-a",
            "--state-dir",
            str(tmp_path / "again"),
        ]
    )
    assert res.returncode == 1 and "already used" in res.stderr

    res = veil_cli(["controller", "token", "list", "--state-dir", str(ctl["state"]), "-o", "json"])
    assert [t["state"] for t in json.loads(res.stdout)] == ["used"]

    before = json.loads(
        veil_cli(["node", "status", "--state-dir", str(node_dir), "-o", "json"]).stdout
    )
    res = veil_cli(["node", "renew", "--state-dir", str(node_dir)])
    assert res.returncode == 0, res.stderr
    after = json.loads(
        veil_cli(["node", "status", "--state-dir", str(node_dir), "-o", "json"]).stdout
    )
    assert after["identity"] == before["identity"] == "spiffe://cluster.local/veil/node/node-a"
    assert after["controller"] == ctl["mtls"]
    assert os.path.exists(node_dir / "node-cert.pem")


def test_cli_errors_are_readable(veil_cli: Any, tmp_path: Path) -> None:
    res = veil_cli(["controller", "token", "create", "--node", "n1", "--state-dir", str(tmp_path)])
    assert res.returncode == 1
    assert "no CA in" in res.stderr and "hint:" in res.stderr
    res = veil_cli(["node", "certificate", "--state-dir", str(tmp_path), "--identity", CHECKOUT])
    assert res.returncode == 1 and "veil node join" in res.stderr
    res = veil_cli(
        ["node", "certificate", "--state-dir", str(tmp_path), "--identity", "spiffe://x/../y"]
    )
    assert res.returncode == 1 and "error:" in res.stderr
    res = veil_cli(
        [
            "controller",
            "token",
            "create",
            "--node",
            "n1",
            "--ttl",
            "soon",
            "--state-dir",
            str(tmp_path),
        ]
    )
    assert res.returncode == 2 and "invalid duration" in res.stderr
