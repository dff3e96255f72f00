"""A waypoint joining in Kubernetes mode against a real kube-apiserver.

The waypoint Deployment's pods join with their own projected token (audience
``veil``) as the principal ``waypoint/<ns>/<sa>/<pod>`` (daemonset/waypoint/).
Here the controller is ``veil controller run --source kubernetes`` on the
veil-controller ServiceAccount's token; the join is ``veil node join`` with
``--token-file``/``--ca-file`` as the template's init container runs it, and the
refusals go through :func:`node.join.join`, the function behind that command.
TokenReview, the pod read-back and the opt-in check are the API server's real
answers. Finally a ``veil waypoint run`` process on loopback syncs its view
from that controller and lists the opted-in Service in its config dump.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from controller.api.errors import ApiError as ControllerApiError
from controller.api.spiffe import workload_identity
from node.join import join, request_certificate

from .conftest import TD, ControllerProcess, pod, root_pem, running_controller
from .control_plane import ROOT, ControlPlane, free_port, stop_process

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

NS = "wp-shop"
WAYPOINT = "shop-waypoint"
WP_SA = "shop-waypoint"
WP_POD = "shop-waypoint-0"


def principal(ns: str, sa: str, pod_name: str) -> str:
    return f"waypoint/{ns}/{sa}/{pod_name}"


@pytest.fixture(scope="module")
def ctl(
    plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControllerProcess]:
    with running_controller(plane, tmp_path_factory.mktemp("ctl"), "ctl-waypoint") as proc:
        yield proc


def _namespace(plane: ControlPlane, name: str, labels: dict[str, str]) -> None:
    plane.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    )


def _service(plane: ControlPlane, ns: str, name: str, labels: dict[str, str]) -> None:
    plane.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        }
    )


def _token(plane: ControlPlane, obj: dict[str, Any]) -> str:
    """A projected-style token (audience veil) bound to the pod ``obj``."""
    meta = obj["metadata"]
    current = plane.request("GET", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}")
    return plane.token(meta["namespace"], current["spec"]["serviceAccountName"], ["veil"], current)


async def _refused(
    plane: ControlPlane, ctl: ControllerProcess, token: str, node: str, tmp: Path
) -> ControllerApiError:
    with pytest.raises(ControllerApiError) as refused:
        await join(ctl.join, token, node, tmp, ca_pem=root_pem(plane), timeout=10)
    return refused.value


def _veil(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.veil", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def shop(plane: ControlPlane) -> dict[str, Any]:
    """Namespace wp-shop opted into shop-waypoint, its waypoint pod and payments."""
    _namespace(plane, NS, {"veil.io/dataplane-mode": "ambient", "veil.io/use-waypoint": WAYPOINT})
    _service(plane, NS, "payments", {})
    pod(
        plane,
        "payments-1",
        NS,
        "10.7.0.10",
        node="node-b",
        sa="payments",
        labels={"app": "payments"},
    )
    return pod(
        plane,
        WP_POD,
        NS,
        "10.7.0.9",
        node="node-a",
        sa=WP_SA,
        labels={"veil.io/waypoint": WAYPOINT, "veil.io/dataplane-mode": "none"},
    )


async def test_a_waypoint_pod_joins_and_obtains_exactly_its_own_identity(
    plane: ControlPlane, ctl: ControllerProcess, shop: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "token").write_text(_token(plane, shop))
    (tmp_path / "root.pem").write_bytes(root_pem(plane))
    state = tmp_path / "state"
    me = principal(NS, WP_SA, WP_POD)
    done = _veil(
        "node", "join",
        "--controller", ctl.join,
        "--token-file", str(tmp_path / "token"),
        "--ca-file", str(tmp_path / "root.pem"),
        "--node", me,
        "--state-dir", str(state),
        "--timeout", "20",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + ctl.output()[-2000:]
    own = f"spiffe://{TD}/ns/{NS}/sa/{WP_SA}"
    cert = _veil("node", "certificate", "--state-dir", str(state), "--identity", own)
    assert cert.returncode == 0, cert.stdout + cert.stderr
    leaf = x509.load_pem_x509_certificates(cert.stdout.encode())[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.UniformResourceIdentifier) == [own]

    # Another workload's identity in the same namespace is refused, with the rule.
    from node.credentials import load_node_credentials

    creds = load_node_credentials(state)
    assert str(creds.identity) == f"spiffe://{TD}/veil/waypoint/{NS}/{WP_SA}/{WP_POD}"
    with pytest.raises(ControllerApiError) as other:
        await request_certificate(creds, workload_identity(TD, NS, "payments"))
    assert other.value.code == "PERMISSION_DENIED"
    assert "its own service account" in other.value.message, other.value


async def test_a_pod_without_the_waypoint_label_is_refused(
    plane: ControlPlane, ctl: ControllerProcess, shop: dict[str, Any], tmp_path: Path
) -> None:
    impostor = pod(plane, "not-a-waypoint", NS, "10.7.0.11", node="node-a", sa=WP_SA)
    e = await _refused(
        plane, ctl, _token(plane, impostor), principal(NS, WP_SA, "not-a-waypoint"), tmp_path
    )
    assert e.code == "PERMISSION_DENIED", e
    assert "no veil.io/waypoint label" in e.message, e
    assert "veil.io/waypoint=<name>" in str(e)


async def test_a_waypoint_nobody_opted_into_is_refused(
    plane: ControlPlane, ctl: ControllerProcess, tmp_path: Path
) -> None:
    # The namespace and its Service name another waypoint (or none).
    _namespace(plane, "wp-lonely", {"veil.io/dataplane-mode": "ambient"})
    _service(plane, "wp-lonely", "orders", {"veil.io/use-waypoint": "someone-else"})
    lonely = pod(
        plane,
        "lonely-wp-0",
        "wp-lonely",
        "10.7.1.9",
        sa="lonely-wp",
        labels={"veil.io/waypoint": "lonely-wp"},
    )
    e = await _refused(
        plane, ctl, _token(plane, lonely), principal("wp-lonely", "lonely-wp", "lonely-wp-0"),
        tmp_path,
    )  # fmt: skip
    assert e.code == "PERMISSION_DENIED", e
    assert "nor a Service in it is labelled veil.io/use-waypoint=lonely-wp" in e.message, e
    assert "kubectl label namespace wp-lonely" in str(e)


async def test_another_service_accounts_token_cannot_take_the_waypoint_identity(
    plane: ControlPlane, ctl: ControllerProcess, shop: dict[str, Any], tmp_path: Path
) -> None:
    # A genuine waypoint replica of the same waypoint, but another ServiceAccount.
    rogue = pod(
        plane,
        "rogue-wp-0",
        NS,
        "10.7.0.12",
        sa="rogue",
        labels={"veil.io/waypoint": WAYPOINT},
    )
    token = _token(plane, rogue)
    # Claiming the real waypoint's principal: refused, the token names its own pod.
    e = await _refused(plane, ctl, token, principal(NS, WP_SA, WP_POD), tmp_path / "a")
    assert e.code == "UNAUTHENTICATED", e
    assert f"joins as 'waypoint/{NS}/rogue/rogue-wp-0'" in e.message, e
    # Joined under its own principal, it still cannot obtain the waypoint's SVID.
    creds = await join(
        ctl.join, token, principal(NS, "rogue", "rogue-wp-0"), tmp_path / "b",
        ca_pem=root_pem(plane), timeout=10,
    )  # fmt: skip
    with pytest.raises(ControllerApiError) as stolen:
        await request_certificate(creds, workload_identity(TD, NS, WP_SA))
    assert stolen.value.code == "PERMISSION_DENIED", stolen.value
    assert "its own service account" in stolen.value.message, stolen.value
    # A workload's token (no waypoint label) asking for the waypoint principal.
    client = pod(plane, "checkout", NS, "10.7.0.13", sa="checkout", labels={"app": "checkout"})
    e = await _refused(
        plane, ctl, _token(plane, client), principal(NS, WP_SA, WP_POD), tmp_path / "c"
    )
    assert e.code == "PERMISSION_DENIED", e
    assert "system:serviceaccount:wp-shop:checkout" in e.message, e


async def test_a_deleted_pods_token_is_refused(
    plane: ControlPlane, ctl: ControllerProcess, shop: dict[str, Any], tmp_path: Path
) -> None:
    gone = pod(plane, "gone-wp-0", NS, "10.7.0.14", sa=WP_SA, labels={"veil.io/waypoint": WAYPOINT})
    token = _token(plane, gone)
    # No kubelet confirms termination: delete at once, as a force delete does.
    plane.request(
        "DELETE",
        f"/api/v1/namespaces/{NS}/pods/gone-wp-0",
        {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0},
    )
    e = await _refused(plane, ctl, token, principal(NS, WP_SA, "gone-wp-0"), tmp_path)
    assert e.code == "UNAUTHENTICATED", e
    assert "Token has been invalidated" in e.message, e
    assert "a deleted pod's token stays invalid" in str(e), e


def _dump(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config_dump", timeout=2) as r:
            doc = json.loads(r.read())
            return doc if isinstance(doc, dict) else None
    except (OSError, ValueError, urllib.error.HTTPError):
        return None


async def test_veil_waypoint_run_syncs_its_view_from_the_kubernetes_controller(
    plane: ControlPlane, ctl: ControllerProcess, shop: dict[str, Any], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    me = principal(NS, WP_SA, WP_POD)
    await join(ctl.join, _token(plane, shop), me, state, ca_pem=root_pem(plane), timeout=20)
    admin = free_port()
    log = tmp_path / "waypoint.log"
    argv = [
        sys.executable, "-m", "cli.veil", "waypoint", "run",
        "--node", me, "--namespace", NS, "--name", WAYPOINT, "--service-account", WP_SA,
        "--state-dir", str(state),
        "--listen-address", "127.0.0.1", "--hbone-port", str(free_port()),
        "--admin-address", f"127.0.0.1:{admin}",
        "--metrics-address", f"127.0.0.1:{free_port()}",
        "--drain-grace-period", "1s",
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        doc: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            doc = _dump(admin)
            if doc and any(
                d["destination"].startswith(f"service:{NS}/payments:")
                for d in doc.get("destinations", [])
            ):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(
                f"no payments destination in {doc}\n{log.read_text(errors='replace')[-3000:]}"
            )
        text = json.dumps(doc)
        assert f"spiffe://{TD}/ns/{NS}/sa/{WP_SA}" in text, doc
        dest = next(
            d for d in doc["destinations"] if d["destination"] == f"service:{NS}/payments:80"
        )
        assert dest["endpoints"] == [f"{NS}/payments-1 10.7.0.10:8080"], dest
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]


async def test_a_waypoint_named_from_another_namespace_is_admitted(
    plane: ControlPlane, ctl: ControllerProcess, tmp_path: Path
) -> None:
    # The waypoint lives in wp-mesh; nothing in wp-mesh opts in. It serves
    # wp-orders (namespace label) and wp-bank/vault (Service label), both
    # naming it with veil.io/use-waypoint-namespace.
    _namespace(plane, "wp-mesh", {})
    shared = pod(
        plane,
        "shared-wp-0",
        "wp-mesh",
        "10.7.2.9",
        sa="shared-wp",
        labels={"veil.io/waypoint": "shared-wp"},
    )
    me = principal("wp-mesh", "shared-wp", "shared-wp-0")
    e = await _refused(plane, ctl, _token(plane, shared), me, tmp_path / "a")
    assert e.code == "PERMISSION_DENIED", e
    assert "veil.io/use-waypoint-namespace=wp-mesh" in str(e), e

    # Same name, wrong namespace: still refused.
    _namespace(
        plane,
        "wp-orders",
        {"veil.io/use-waypoint": "shared-wp", "veil.io/use-waypoint-namespace": "elsewhere"},
    )
    e = await _refused(plane, ctl, _token(plane, shared), me, tmp_path / "b")
    assert e.code == "PERMISSION_DENIED", e

    _namespace(plane, "wp-bank", {})
    _service(
        plane,
        "wp-bank",
        "vault",
        {"veil.io/use-waypoint": "shared-wp", "veil.io/use-waypoint-namespace": "wp-mesh"},
    )
    creds = await join(
        ctl.join, _token(plane, shared), me, tmp_path / "c", ca_pem=root_pem(plane), timeout=10
    )
    _, chain = await request_certificate(creds, workload_identity(TD, "wp-mesh", "shared-wp"))
    leaf = x509.load_pem_x509_certificates(chain[0])[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TD}/ns/wp-mesh/sa/shared-wp"
    ]
