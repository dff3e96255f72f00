"""Which client address an inbound tunnel is authorized and connected as (pure).

Lives with the proxy tests because it is the proxy's decision; no sockets.
"""

from __future__ import annotations

import pytest

from controller.api.model import Labels, Workload
from controller.api.spiffe import SpiffeId, workload_identity
from node.state import Snapshot, build_snapshot
from ztunnel.hbone import ConnectRequest
from ztunnel.proxy.decide import InboundSource, inbound_source

CHECKOUT = workload_identity("cluster.local", "shop", "checkout")


def snapshot() -> Snapshot:
    def wl(name: str, sa: str, ip: str, node: str) -> Workload:
        return Workload(name, "shop", sa, node, (ip,), Labels({"app": name}), enrolled=True)

    return build_snapshot(
        "node-b",
        [
            wl("checkout-1", "checkout", "10.0.1.10", "node-a"),
            wl("checkout-2", "checkout", "10.0.3.10", "node-c"),
            wl("other", "other", "10.0.1.11", "node-a"),
        ],
        epoch="e",
        version=1,
        trust_bundle=None,
    )


def request(forwarded: tuple[str, int | None] | None, peer: SpiffeId = CHECKOUT) -> ConnectRequest:
    return ConnectRequest(
        stream_id=1,
        peer_identity=peer,
        host="10.0.2.10",
        port=8080,
        l3_dst="10.0.2.10",
        peer_addr=("192.168.0.1", 40000),
        forwarded_for=forwarded,
    )


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        # The claimed client is a pod with the peer's identity: connect as it.
        (("10.0.1.10", 5555), InboundSource("10.0.1.10", 5555, transparent=True)),
        # Any pod of the same service account counts (identity, not pod).
        (("10.0.3.10", None), InboundSource("10.0.3.10", 0, transparent=True)),
        # No forwarded header: the tunnel's own source, not transparently.
        (None, InboundSource("192.168.0.1", 40000, transparent=False)),
        # checkout's certificate claiming other's address: refused.
        (("10.0.1.11", 1), "belongs to spiffe://cluster.local/ns/shop/sa/other"),
        # An address no workload owns: refused.
        (("10.9.9.9", 1), "is not a known workload"),
    ],
)
def test_inbound_source(
    forwarded: tuple[str, int | None] | None, expected: InboundSource | str
) -> None:
    got = inbound_source(snapshot(), request(forwarded))
    if isinstance(expected, str):
        assert isinstance(got, str) and expected in got
    else:
        assert got == expected
