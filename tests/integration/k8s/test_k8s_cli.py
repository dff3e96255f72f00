"""Kubernetes mode through the commands an operator runs.

``veil controller run --source kubernetes`` reads the API server double, and a
node joins with ``veil node join --token-file --ca-file`` exactly as the
DaemonSet's init container does: its projected ServiceAccount token, and the
roots from the ``veil-ca-root`` ConfigMap the controller publishes. Issuance is
then node-scoped through ``veil node certificate``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.controller import ControllerProcess

from .conftest import ThreadedApiServer
from .test_k8s_controller import configmap_roots, seed_cluster


def veil(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.veil", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def controller(apiserver: ThreadedApiServer, tmp_path: Path) -> Iterator[tuple[str, str]]:
    token_file = tmp_path / "controller-token"
    token_file.write_text(apiserver.token)
    ctrl = ControllerProcess(
        tmp_path,
        state_path=tmp_path / "controller",
        extra=(
            "--source",
            "kubernetes",
            "--kube-api",
            apiserver.url,
            "--kube-token-file",
            str(token_file),
        ),
    ).start()
    try:
        yield ctrl.mtls, ctrl.join_addr
    finally:
        ctrl.stop()


def test_controller_cli_reads_the_cluster_and_a_node_joins_with_its_sa_token(
    apiserver: ThreadedApiServer, controller: tuple[str, str], tmp_path: Path
) -> None:
    tokens = seed_cluster(apiserver)
    mtls, join = controller
    deadline = time.monotonic() + 30
    while (roots := configmap_roots(apiserver)) is None:
        assert time.monotonic() < deadline, (tmp_path / "controller.log").read_text()
        time.sleep(0.1)
    ca_file = tmp_path / "root-cert.pem"
    ca_file.write_bytes(roots)
    token_file = tmp_path / "sa-token"
    token_file.write_text(tokens["node-a"])
    state = tmp_path / "node-a"

    joined = None
    while time.monotonic() < deadline:  # the controller binds after its first full list
        joined = veil(
            "node",
            "join",
            "--controller",
            join,
            "--controller-mtls",
            mtls,
            "--token-file",
            str(token_file),
            "--ca-file",
            str(ca_file),
            "--node",
            "node-a",
            "--state-dir",
            str(state),
        )
        if joined.returncode == 0:
            break
        time.sleep(0.3)
    assert joined is not None and joined.returncode == 0, joined.stderr

    own = veil(
        "node",
        "certificate",
        "--state-dir",
        str(state),
        "--identity",
        "spiffe://cluster.local/ns/shop/sa/checkout",
    )
    assert own.returncode == 0, own.stderr
    leaf = x509.load_pem_x509_certificate(own.stdout.encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/shop/sa/checkout"
    ]

    # payments runs on node-b: node-a's credential cannot mint it.
    other = veil(
        "node",
        "certificate",
        "--state-dir",
        str(state),
        "--identity",
        "spiffe://cluster.local/ns/shop/sa/payments",
    )
    assert other.returncode == 1
    assert "PERMISSION_DENIED" in other.stderr

    # A token the API server does not know is refused with the reason.
    bad = tmp_path / "bad-token"
    bad.write_text("not-a-real-token")
    refused = veil(
        "node",
        "join",
        "--controller",
        join,
        "--token-file",
        str(bad),
        "--ca-file",
        str(ca_file),
        "--node",
        "node-a",
        "--state-dir",
        str(tmp_path / "bad"),
    )
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr
