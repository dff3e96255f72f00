"""Readiness and /config_dump content (pure; the HTTP side is in tests/integration)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from controller.api.model import (
    AuthorizationPolicy,
    Labels,
    Namespace,
    Operation,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    RegistryState,
    Rule,
    Service,
    ServicePort,
    Source,
    TrustBundle,
    WatchUpdate,
    Workload,
)
from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from controller.identity import IdentityService
from node.state import StateStore
from ztunnel.admin import Readiness, config_dump
from ztunnel.identity import CertManager

NODE = "node-a"
A = Workload("a-1", "shop", "alpha", NODE, ("10.0.1.1",), Labels({"app": "a"}), enrolled=True)
R = Workload("r-1", "shop", "remote", "node-b", ("10.0.2.1",), enrolled=True)
POLICY = AuthorizationPolicy(
    "from-web",
    "shop",
    PolicyAction.ALLOW,
    (
        Rule(
            (Source(principals=("cluster.local/ns/web/sa/web",), ip_blocks=("10.0.0.0/8",)),),
            (Operation(ports=(8080,)),),
        ),
    ),
    Labels({"app": "a"}),
)
PA = PeerAuthentication("strict", "shop", PeerAuthMode.STRICT)
SVC = Service(
    "s", "shop", ("10.96.0.1",), (ServicePort(80, 8080, "http"),), endpoints=("shop/r-1",)
)


class Signer:
    def __init__(self, backend: IdentityService) -> None:
        self.backend = backend

    async def create_certificate(
        self, csr_pem: bytes, identity: str, ttl_seconds: int = 0, timeout: float = 10.0
    ) -> tuple[bytes, ...]:
        return await self.backend.create_certificate(NODE, csr_pem, identity, ttl_seconds)


def make_certs(tmp: Path) -> tuple[CertManager, TrustBundle]:
    ca = CertificateAuthority.load_or_create(tmp / "ca")
    svc = IdentityService(
        ca,
        JoinTokenStore(tmp / "ca"),
        lambda: RegistryState(workloads=(A,)),
        default_ttl=timedelta(hours=1),
    )
    return CertManager(Signer(svc), ca.trust_bundle), ca.trust_bundle()


async def test_readiness_follows_snapshot_and_certificates(tmp_path: Path) -> None:
    certs, bundle = make_certs(tmp_path)
    store = StateStore(NODE)
    store.subscribe(certs.on_state_change)
    ready = Readiness(store, certs)
    try:
        r = ready.check()
        assert not r.ready and "first snapshot" in r.reasons[0]
        store.apply(WatchUpdate("e", 1, True, (R,), (), bundle))
        assert ready.check().ready  # no local workloads: nothing to wait for
        store.apply(WatchUpdate("e", 2, False, (A,)))
        r = ready.check()
        assert not r.ready and "spiffe://cluster.local/ns/shop/sa/alpha" in r.reasons[0]
        await certs.fetch(A.identity, timeout=10)
        assert ready.check().ready
        state = {"bound": False}
        ready.add_check("listeners", lambda: None if state["bound"] else "15001 not bound")
        r = ready.check()
        assert not r.ready and r.reasons == ("listeners: 15001 not bound",)
        state["bound"] = True
        assert ready.check().to_json() == {"ready": True, "reasons": []}

        def broken() -> str | None:
            raise RuntimeError("boom")

        ready.add_check("broken", broken)
        assert "boom" in ready.check().reasons[0]
    finally:
        await certs.close()


async def test_config_dump_lists_state_certificates_and_connections(tmp_path: Path) -> None:
    certs, bundle = make_certs(tmp_path)
    store = StateStore(NODE)
    try:
        store.apply(
            WatchUpdate("e", 7, True, (Namespace("shop"), A, R, SVC, POLICY, PA), (), bundle)
        )
        await certs.fetch(A.identity, timeout=10)
        doc = config_dump(
            store.current,
            certificates=certs.dump(),
            controller={"connected": True},
            connections=[{"src": "10.0.1.1:5000", "dst": "10.0.2.1:8080"}],
        )
        text = json.dumps(doc)
        assert "PRIVATE KEY" not in text and "key_pem" not in text
        assert doc["node"] == NODE
        assert doc["state"] == {
            "synced": True,
            "epoch": "e",
            "version": 7,
            "trust_domain": "cluster.local",
        }
        wl = {w["key"]: w for w in doc["workloads"]}
        assert wl["shop/a-1"]["local"] and not wl["shop/r-1"]["local"]
        assert wl["shop/a-1"]["identity"] == "spiffe://cluster.local/ns/shop/sa/alpha"
        assert wl["shop/a-1"]["peer_authentication"] == "STRICT"
        assert wl["shop/a-1"]["policies"] == ["shop/from-web"]
        assert wl["shop/r-1"]["policies"] == []
        assert doc["policies"] == [
            {
                "key": "shop/from-web",
                "name": "from-web",
                "namespace": "shop",
                "action": "ALLOW",
                "selector": {"app": "a"},
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "principals": ["cluster.local/ns/web/sa/web"],
                                    "ipBlocks": ["10.0.0.0/8"],
                                }
                            }
                        ],
                        "to": [{"operation": {"ports": [8080]}}],
                    }
                ],
                "target_refs": [],
                "l7_terms": [],
            }
        ]
        assert doc["peer_authentications"][0]["mode"] == "STRICT"
        assert doc["services"][0]["ports"] == [{"name": "http", "port": 80, "target_port": 8080}]
        assert doc["namespaces"] == [{"name": "shop", "labels": {}, "enrolled": False}]
        (cert,) = doc["certificates"]
        assert cert["identity"] == str(A.identity) and cert["state"] == "valid"
        assert {"serial", "not_after", "rotation_due", "expires_in_seconds"} <= set(cert)
        assert doc["connections"][0]["dst"] == "10.0.2.1:8080"
        assert doc["trust_bundle"]["trust_domain"] == "cluster.local"
        assert len(doc["trust_bundle"]["roots"][0]["sha256"]) == 64
    finally:
        await certs.close()
