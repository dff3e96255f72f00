"""Table-driven tests of the pure inbound decisions (decide_inbound, decide_plaintext).

No sockets: a snapshot and the addresses in, a frozen decision out.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from controller.api.model import (
    AuthorizationPolicy,
    Labels,
    Operation,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    Rule,
    Source,
    Workload,
)
from controller.api.spiffe import SpiffeId, workload_identity
from node.state import Snapshot, build_snapshot
from ztunnel.hbone import ConnectRequest
from ztunnel.proxy.decide import Admit, Reject, decide_inbound, decide_plaintext
from ztunnel.proxy.errors import FLAG_NO_ROUTE, FLAG_POLICY_DENIED
from ztunnel.proxy.sockets import Address

NODE = "node-b"
CHECKOUT = workload_identity("cluster.local", "shop", "checkout")
OTHER = workload_identity("cluster.local", "shop", "other")
OWN_PORTS = frozenset({15001, 15006, 15008})


def wl(name: str, sa: str, ip: str, node: str = NODE, *, enrolled: bool = True) -> Workload:
    return Workload(name, "shop", sa, node, (ip,), Labels({"app": name}), enrolled=enrolled)


def pol(name: str, action: PolicyAction, app: str, *rules: Rule) -> AuthorizationPolicy:
    return AuthorizationPolicy(name, "shop", action, tuple(rules), Labels({"app": app}))


CHECKOUT_1 = wl("checkout-1", "checkout", "10.0.1.10", "node-a")
OTHER_1 = wl("other", "other", "10.0.1.11", "node-a")
PAY = wl("pay", "payments", "10.0.2.10")
LEGACY = wl("legacy", "legacy", "10.0.2.20", enrolled=False)
VAULT = wl("vault", "vault", "10.0.2.30")
OPEN = wl("open", "open", "10.0.2.40")
GUARDED = wl("guarded", "guarded", "10.0.2.50")
REMOTE = wl("remote", "remote", "10.0.3.10", "node-c")


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return build_snapshot(
        NODE,
        [
            CHECKOUT_1, OTHER_1, PAY, LEGACY, VAULT, OPEN, GUARDED, REMOTE,
            pol("pay-allow", PolicyAction.ALLOW, "pay",
                Rule(sources=(Source(principals=("cluster.local/ns/shop/sa/checkout",)),))),
            pol("pay-deny-9000", PolicyAction.DENY, "pay",
                Rule(operations=(Operation(ports=(9000,)),))),
            pol("deny-anon", PolicyAction.DENY, "guarded",
                Rule(sources=(Source(not_principals=("*",)),))),
            PeerAuthentication("vault-strict", "shop", PeerAuthMode.STRICT, Labels({"app": "vault"})),
        ],
        epoch="e",
        version=1,
        trust_bundle=None,
    )  # fmt: skip


@dataclass(frozen=True)
class In:
    id: str
    host: str
    port: int
    peer: SpiffeId
    forwarded: tuple[str, int | None] | None
    kind: type[Admit] | type[Reject]
    client: Address
    flags: str | None = None  # Reject only
    reason: str = ""
    policy: str | None = None
    transparent: bool = True
    destination: Workload | None = None
    source: Workload | None = None


PEER_ADDR = Address("192.168.0.1", 40000)

INBOUND = [
    In("forwarded-client-allowed", "10.0.2.10", 8080, CHECKOUT, ("10.0.1.10", 5555), Admit,
       Address("10.0.1.10", 5555), policy="shop/pay-allow", destination=PAY, source=CHECKOUT_1),
    In("no-forwarded-uses-tunnel-source", "10.0.2.10", 8080, CHECKOUT, None, Admit, PEER_ADDR,
       policy="shop/pay-allow", transparent=False, destination=PAY),
    In("forwarded-without-port", "10.0.2.10", 8080, CHECKOUT, ("10.0.1.10", None), Admit,
       Address("10.0.1.10", 0), policy="shop/pay-allow", destination=PAY, source=CHECKOUT_1),
    In("destination-on-another-node", "10.0.3.10", 80, CHECKOUT, ("10.0.1.10", 1), Reject,
       Address("10.0.1.10", 1), FLAG_NO_ROUTE, "not an enrolled workload of this node",
       source=CHECKOUT_1),
    In("destination-not-enrolled", "10.0.2.20", 80, CHECKOUT, ("10.0.1.10", 1), Reject,
       Address("10.0.1.10", 1), FLAG_NO_ROUTE, "not an enrolled workload of this node",
       source=CHECKOUT_1),
    In("destination-unknown", "10.0.2.99", 80, CHECKOUT, None, Reject, PEER_ADDR, FLAG_NO_ROUTE,
       "not an enrolled workload of this node"),
    In("forwarded-ip-of-another-identity", "10.0.2.10", 8080, CHECKOUT, ("10.0.1.11", 1), Reject,
       PEER_ADDR, FLAG_POLICY_DENIED, "belongs to spiffe://cluster.local/ns/shop/sa/other",
       destination=PAY),
    In("forwarded-ip-unknown", "10.0.2.10", 8080, CHECKOUT, ("10.9.9.9", 1), Reject, PEER_ADDR,
       FLAG_POLICY_DENIED, "is not a known workload", destination=PAY),
    In("principal-not-allowed", "10.0.2.10", 8080, OTHER, ("10.0.1.11", 7), Reject,
       Address("10.0.1.11", 7), FLAG_POLICY_DENIED, "no ALLOW policy matched",
       destination=PAY, source=OTHER_1),
    In("deny-policy-on-port", "10.0.2.10", 9000, CHECKOUT, ("10.0.1.10", 7), Reject,
       Address("10.0.1.10", 7), FLAG_POLICY_DENIED, "denied by DENY policy",
       policy="shop/pay-deny-9000", destination=PAY, source=CHECKOUT_1),
    In("strict-destination-over-mtls", "10.0.2.30", 80, OTHER, ("10.0.1.11", 7), Admit,
       Address("10.0.1.11", 7), destination=VAULT, source=OTHER_1),
    In("deny-unauthenticated-does-not-hit-mtls", "10.0.2.50", 80, OTHER, None, Admit, PEER_ADDR,
       transparent=False, destination=GUARDED),
]  # fmt: skip


@pytest.mark.parametrize("case", INBOUND, ids=[c.id for c in INBOUND])
def test_decide_inbound(snap: Snapshot, case: In) -> None:
    request = ConnectRequest(
        stream_id=1,
        peer_identity=case.peer,
        host=case.host,
        port=case.port,
        l3_dst=case.host,
        peer_addr=(PEER_ADDR.ip, PEER_ADDR.port),
        forwarded_for=case.forwarded,
    )
    d = decide_inbound(snap, request)
    assert isinstance(d, case.kind), d
    assert d.client == case.client
    assert d.destination == case.destination
    assert d.source == case.source
    assert d.policy == case.policy
    if isinstance(d, Reject):
        assert d.flags == case.flags
        assert case.reason in d.reason
    else:
        assert d.transparent is case.transparent
        assert d.authz.src_identity == case.peer
        assert (d.authz.src_ip, d.authz.dst_ip, d.authz.dst_port) == (
            case.client.ip,
            case.host,
            case.port,
        )


@dataclass(frozen=True)
class Plain:
    id: str
    src: str
    dst: str
    port: int
    kind: type[Admit] | type[Reject]
    flags: str | None = None
    reason: str = ""
    policy: str | None = None
    destination: Workload | None = None
    source: Workload | None = None


PLAINTEXT = [
    Plain("permissive-no-policy", "192.168.0.1", "10.0.2.40", 80, Admit, destination=OPEN),
    Plain("source-workload-is-reported", "10.0.1.10", "10.0.2.40", 80, Admit, destination=OPEN,
          source=CHECKOUT_1),
    Plain("strict-refuses", "192.168.0.1", "10.0.2.30", 80, Reject, FLAG_POLICY_DENIED,
          "STRICT", destination=VAULT),
    Plain("principal-rule-cannot-match", "192.168.0.1", "10.0.2.10", 8080, Reject,
          FLAG_POLICY_DENIED, "no ALLOW policy matched", destination=PAY),
    Plain("not-principals-star-denies-anonymous", "192.168.0.1", "10.0.2.50", 80, Reject,
          FLAG_POLICY_DENIED, "denied by DENY policy", "shop/deny-anon", GUARDED),
    Plain("destination-on-another-node", "192.168.0.1", "10.0.3.10", 80, Reject, FLAG_NO_ROUTE,
          "not an enrolled workload of this node", destination=REMOTE),
    Plain("destination-not-enrolled", "192.168.0.1", "10.0.2.20", 80, Reject, FLAG_NO_ROUTE,
          "not an enrolled workload of this node", destination=LEGACY),
    Plain("destination-unknown", "192.168.0.1", "10.0.2.99", 80, Reject, FLAG_NO_ROUTE,
          "not an enrolled workload of this node"),
    Plain("port-of-the-ztunnel-itself", "192.168.0.1", "10.0.2.40", 15008, Reject, FLAG_NO_ROUTE,
          "reserved for the ztunnel", destination=OPEN),
    Plain("policy-before-reserved-port", "192.168.0.1", "10.0.2.30", 15006, Reject,
          FLAG_POLICY_DENIED, "STRICT", destination=VAULT),
    Plain("ipv4-mapped-destination", "192.168.0.1", "::ffff:10.0.2.40", 80, Admit,
          destination=OPEN),
]  # fmt: skip


@pytest.mark.parametrize("case", PLAINTEXT, ids=[c.id for c in PLAINTEXT])
def test_decide_plaintext(snap: Snapshot, case: Plain) -> None:
    client, dst = Address(case.src, 40000), Address(case.dst, case.port)
    d = decide_plaintext(snap, client, dst, OWN_PORTS)
    assert isinstance(d, case.kind), d
    assert d.client == client
    assert d.destination == case.destination
    assert d.source == case.source
    assert d.policy == case.policy
    if isinstance(d, Reject):
        assert d.flags == case.flags
        assert case.reason in d.reason
    else:
        assert d.transparent is True
        assert d.authz.src_identity is None
        assert (d.authz.src_ip, d.authz.dst_ip, d.authz.dst_port) == (case.src, case.dst, case.port)


def test_decisions_are_pure(snap: Snapshot) -> None:
    client, dst = Address("192.168.0.1", 1), Address("10.0.2.40", 80)
    assert decide_plaintext(snap, client, dst) == decide_plaintext(snap, client, dst)
