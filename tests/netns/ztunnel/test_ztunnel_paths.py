"""The data paths through real ztunnels on a two-node lab (see ztunnel_lab.py).

Pods connect with their own network stack; the node's steering hands the
connections to the ztunnels, which talk HBONE over the underlay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509

from controller.api.spiffe import workload_identity
from controller.ca import CertificateAuthority
from lab.apps import echo_roundtrip, whoami
from lab.capture import UnderlayCapture
from lab.netns import in_netns
from node import load_node_credentials
from node.dataplane import HBONE_PORT
from tests.support.ztunnel_lab import APP_PORT, NODE_A, NODE_B, Lab, connect_from, expect_refused
from ztunnel.hbone import HboneClientPool, HboneConnectError
from ztunnel.identity import WorkloadCertificate, build_csr, generate_key, key_pem

WHOAMI = 8081  # payments runs echo on 8080 and whoami on 8081
MARKER = b"VEIL-ZTUNNEL-PLAINTEXT-MARKER-41f3"


def test_cross_node_hbone_is_intact_encrypted_and_shows_real_client(lab: Lab) -> None:
    with UnderlayCapture(lab.mesh.topo) as cap:
        with connect_from(lab, "checkout", lab.ip("payments"), WHOAMI) as s:
            who = whoami(s)
        payload = MARKER + os.urandom(8 << 20) + MARKER
        with connect_from(lab, "checkout", lab.ip("payments"), APP_PORT) as s:
            echoed = echo_roundtrip(s, payload)
        assert cap.wait_for(lambda c: c.tls_records_seen() > 100)
    assert who.peer_ip == lab.ip("checkout")
    assert who.local_ip == lab.ip("payments")
    assert echoed == payload
    assert not cap.contains(MARKER), "plaintext crossed the underlay"
    assert HBONE_PORT in cap.tcp_connection_ports() or HBONE_PORT in cap.tcp_ports_seen()
    assert APP_PORT not in cap.tcp_ports_seen() and WHOAMI not in cap.tcp_ports_seen()


def test_service_vip_reaches_an_endpoint_over_hbone(lab: Lab) -> None:
    with connect_from(lab, "checkout", "10.96.0.20", 80) as s:
        who = whoami(s)
    assert (who.local_ip, who.local_port) == (lab.ip("payments"), WHOAMI)
    assert who.peer_ip == lab.ip("checkout")


def test_destination_outside_the_mesh_is_passed_through(lab: Lab) -> None:
    server = lab.serve("legacy-server", "whoami", 9090)
    try:
        with connect_from(lab, "checkout", lab.ip("legacy-server"), 9090) as s:
            who = whoami(s)
    finally:
        server.stop()
    # Direct, from the node (no tunnel: the destination has no ztunnel to talk to).
    assert who.peer_ip == lab.mesh.topo.node(NODE_A).underlay_ip
    lab.wait_log(NODE_A, '"route":"passthrough"')


def test_denied_client_is_reset_before_any_server_byte(lab: Lab) -> None:
    # intruder's identity is not allowed by payments' policy: node-b answers the
    # CONNECT with 401 and node-a resets the pod's connection.
    expect_refused(lab, "intruder", lab.ip("payments"), WHOAMI)
    lab.wait_log(NODE_B, '"src_workload":"shop/intruder"')
    lab.wait_log(NODE_A, '"response_flags":"RBAC"')


def test_same_node_enforces_policy_without_tls(lab: Lab) -> None:
    with UnderlayCapture(lab.mesh.topo) as cap:
        with connect_from(lab, "checkout", lab.ip("other"), APP_PORT) as s:
            who = whoami(s)
        expect_refused(lab, "intruder", lab.ip("other"), APP_PORT)
    assert who.peer_ip == lab.ip("checkout")
    assert who.local_ip == lab.ip("other")
    assert APP_PORT not in cap.tcp_ports_seen()
    assert HBONE_PORT not in cap.tcp_connection_ports()


def test_strict_refuses_plaintext_and_permissive_accepts_it(lab: Lab) -> None:
    # legacy-client is not in the mesh: its traffic leaves node-a unsteered and
    # node-b's plaintext listener decides.
    expect_refused(lab, "legacy-client", lab.ip("payments"), WHOAMI)
    lab.wait_log(NODE_B, "STRICT (mTLS required)")
    with connect_from(lab, "legacy-client", lab.ip("inventory"), APP_PORT) as s:
        who = whoami(s)
    assert who.peer_ip == lab.ip("legacy-client")


def payments_policy(dump: dict[str, Any]) -> str:
    (policy,) = [p for p in dump["policies"] if p["name"] == "payments-allow-checkout"]
    return json.dumps(policy)


def test_policy_change_closes_live_connection(lab: Lab) -> None:
    sock = connect_from(lab, "checkout", lab.ip("payments"), APP_PORT)
    try:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"

        def drop_checkout(doc: dict[str, Any]) -> None:
            rule = doc["authorizationPolicies"][0]["spec"]["rules"][0]
            rule["from"][0]["source"]["principals"] = ["cluster.local/ns/shop/sa/nobody"]

        lab.set_registry(drop_checkout)
        sock.settimeout(10)
        with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
                time.sleep(0.05)
    finally:
        sock.close()
        lab.restore_registry()
    lab.wait_log(NODE_B, "policy re-check")
    # Restored: checkout is allowed again.
    lab.wait_state(NODE_B, lambda d: "sa/checkout" in payments_policy(d))
    with connect_from(lab, "checkout", lab.ip("payments"), WHOAMI) as s:
        assert whoami(s).peer_ip == lab.ip("checkout")


def foreign_certificate(work: Any) -> WorkloadCertificate:
    """checkout's identity from a CA the mesh does not trust."""
    checkout = workload_identity("cluster.local", "shop", "checkout")
    ca = CertificateAuthority.load_or_create(work, "cluster.local")
    key = generate_key()
    chain = ca.sign_csr(build_csr(key, checkout), checkout, timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(chain[0])
    return WorkloadCertificate(
        identity=checkout,
        key_pem=key_pem(key),
        chain_pem=tuple(chain),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
    )


async def test_peer_with_foreign_ca_is_refused_and_logged(lab: Lab, tmp_path: Any) -> None:

    node_a = lab.mesh.topo.node(NODE_A)
    bundle = load_node_credentials(lab.mesh.node_dir(NODE_A)).trust_bundle()

    async def dial(ip: str, port: int) -> socket.socket:
        with in_netns(node_a.netns):
            sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    pool = HboneClientPool(lambda: bundle, connect=dial)
    try:
        with pytest.raises(HboneConnectError):
            await pool.open_stream(
                foreign_certificate(tmp_path / "foreign-ca"),
                lab.ip("payments"),
                HBONE_PORT,
                workload_identity("cluster.local", "shop", "payments"),
                (lab.ip("payments"), WHOAMI),
            )
    finally:
        await pool.shutdown(0.1)
    lab.wait_log(NODE_B, "TLS handshake")


def test_rotation_during_long_transfer_drops_nothing(lab: Lab) -> None:
    """Certificates live 10 s here; 12 s of echo and a new connection every
    second cross at least two rotations on each node without a lost byte."""

    def serials(node: str) -> set[str]:
        return {str(c.get("serial")) for c in lab.mesh.config_dump(node)["certificates"]}

    before_a, before_b = serials(NODE_A), serials(NODE_B)
    sock = connect_from(lab, "checkout", lab.ip("payments"), APP_PORT)
    sock.settimeout(10)
    sent = made = 0
    next_new = time.monotonic() + 1
    deadline = time.monotonic() + 12
    with sock:
        while time.monotonic() < deadline:
            chunk = os.urandom(32 * 1024)
            sock.sendall(chunk)
            got = b""
            while len(got) < len(chunk):
                part = sock.recv(len(chunk) - len(got))
                assert part, "the long connection was closed during rotation"
                got += part
            assert got == chunk
            sent += len(chunk)
            if time.monotonic() >= next_new:
                with connect_from(lab, "checkout", lab.ip("payments"), WHOAMI) as s:
                    assert whoami(s).peer_ip == lab.ip("checkout")
                made += 1
                next_new += 1
            time.sleep(0.01)
    assert made >= 10 and sent > 5 << 20
    assert not serials(NODE_A) & before_a, "node-a did not rotate"
    assert not serials(NODE_B) & before_b, "node-b did not rotate"


def test_controller_outage_keeps_existing_and_new_connections(lab: Lab) -> None:
    """Last on purpose: it stops the controller (and starts it again)."""
    sock = connect_from(lab, "checkout", lab.ip("payments"), APP_PORT)
    assert lab.mesh.controller is not None
    try:
        sock.sendall(b"before")
        assert sock.recv(6) == b"before"
        lab.mesh.controller.close()
        lab.wait_state(NODE_A, lambda d: not d["controller"]["connected"])
        lab.wait_state(NODE_B, lambda d: not d["controller"]["connected"])
        sock.sendall(b"during")
        assert sock.recv(6) == b"during"
        with connect_from(lab, "checkout", lab.ip("payments"), WHOAMI) as s:
            assert whoami(s).peer_ip == lab.ip("checkout")
    finally:
        sock.close()
        with contextlib.suppress(Exception):
            lab.mesh.start_controller()
    lab.wait_state(NODE_A, lambda d: d["controller"]["connected"])
