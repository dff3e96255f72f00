"""Data-plane constants shared by the agent, the eBPF programs, the ztunnel and the waypoint.

The BPF C side receives these as ``-D`` flags built from this module, so the
numbers exist in exactly one place.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ADMIN_PORT",
    "AGENT_METRICS_PORT",
    "HBONE_PORT",
    "INBOUND_PLAINTEXT_PORT",
    "MARK_MASK",
    "MARK_REDIRECT",
    "MARK_ZTUNNEL",
    "METRICS_PORT",
    "OUTBOUND_PORT",
    "READINESS_PORT",
    "ROUTE_TABLE",
    "RULE_PRIORITY",
]

OUTBOUND_PORT: Final = 15001
INBOUND_PLAINTEXT_PORT: Final = 15006
HBONE_PORT: Final = 15008
ADMIN_PORT: Final = 15000
METRICS_PORT: Final = 15020
READINESS_PORT: Final = 15021
# The agent's Prometheus endpoint (the ztunnel's is METRICS_PORT). Istio leaves
# 15022 unused, so a node can run both meshes' ports side by side.
AGENT_METRICS_PORT: Final = 15022

# Packets steered to a ztunnel listener carry MARK_REDIRECT so the fwmark rule
# routes them to the local table (`local 0.0.0.0/0 dev lo`). Sockets the ztunnel
# opens carry MARK_ZTUNNEL (SO_MARK) so guards and steering let them pass.
MARK_MASK: Final = 0x0F00
MARK_REDIRECT: Final = 0x0100
MARK_ZTUNNEL: Final = 0x0200
ROUTE_TABLE: Final = 150
RULE_PRIORITY: Final = 150
