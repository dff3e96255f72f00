"""Policy routing that delivers steered packets locally.

bpf_sk_assign() only attaches a socket to the packet; the packet still has
to be routed to local input. The programs mark every steered packet with
MARK_REDIRECT, and::

    ip rule add fwmark MARK_REDIRECT/MARK_MASK lookup ROUTE_TABLE priority RULE_PRIORITY
    ip route add local 0.0.0.0/0 dev lo table ROUTE_TABLE

make any marked packet local, whatever its destination address. Both are
installed idempotently and removed by uninstall. The numbers come from
controller/api/dataplane.py.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError as PyrNetlinkError

from agent.errors import NetlinkError
from node.dataplane import MARK_MASK, MARK_REDIRECT, ROUTE_TABLE, RULE_PRIORITY

__all__ = ["PolicyRouting", "ensure_policy_routing", "policy_routing", "remove_policy_routing"]

_RTN_LOCAL = 2
_RT_SCOPE_HOST = 254


@dataclass(frozen=True)
class PolicyRouting:
    """Whether the fwmark rule and the local route are in place."""

    rule: bool
    route: bool

    @property
    def complete(self) -> bool:
        return self.rule and self.route


def _our_rules(ipr: Any) -> list[Any]:
    found = []
    for msg in ipr.get_rules(family=socket.AF_INET):
        table = msg.get_attr("FRA_TABLE") or msg["table"]
        if (
            msg.get_attr("FRA_PRIORITY") == RULE_PRIORITY
            and msg.get_attr("FRA_FWMARK") == MARK_REDIRECT
            and msg.get_attr("FRA_FWMASK") == MARK_MASK
            and table == ROUTE_TABLE
        ):
            found.append(msg)
    return found


def _our_routes(ipr: Any) -> list[Any]:
    return [
        msg
        for msg in ipr.get_routes(family=socket.AF_INET, table=ROUTE_TABLE)
        if msg["type"] == _RTN_LOCAL and msg["dst_len"] == 0
    ]


def policy_routing(ipr: Any) -> PolicyRouting:
    try:
        return PolicyRouting(rule=bool(_our_rules(ipr)), route=bool(_our_routes(ipr)))
    except PyrNetlinkError as exc:
        raise _error(exc, "read the policy routing state") from exc


def ensure_policy_routing(ipr: Any) -> None:
    """Install the rule and the local route unless present."""
    try:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.route(
            "replace",
            dst="0.0.0.0/0",
            type=_RTN_LOCAL,
            scope=_RT_SCOPE_HOST,
            oif=lo,
            table=ROUTE_TABLE,
        )
        if not _our_rules(ipr):
            ipr.rule(
                "add",
                family=socket.AF_INET,
                fwmark=MARK_REDIRECT,
                fwmask=MARK_MASK,
                table=ROUTE_TABLE,
                priority=RULE_PRIORITY,
            )
    except PyrNetlinkError as exc:
        if exc.code == errno.EEXIST:
            return
        raise _error(exc, "install the fwmark rule and local route") from exc


def remove_policy_routing(ipr: Any) -> None:
    """Remove the rule and the route (idempotent)."""
    try:
        for _ in range(8):  # duplicates, if someone added the rule twice; bounded
            if not _our_rules(ipr):
                break
            ipr.rule(
                "del",
                family=socket.AF_INET,
                fwmark=MARK_REDIRECT,
                fwmask=MARK_MASK,
                table=ROUTE_TABLE,
                priority=RULE_PRIORITY,
            )
        for msg in _our_routes(ipr):
            ipr.route(
                "del",
                dst="0.0.0.0/0",
                type=_RTN_LOCAL,
                scope=_RT_SCOPE_HOST,
                table=ROUTE_TABLE,
                oif=msg.get_attr("RTA_OIF"),
            )
    except PyrNetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ESRCH):
            return
        raise _error(exc, "remove the fwmark rule and local route") from exc


def _error(exc: PyrNetlinkError, action: str) -> NetlinkError:
    hint = "the agent needs CAP_NET_ADMIN in the node's network namespace"
    if exc.code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
        hint = "the kernel needs CONFIG_IP_MULTIPLE_TABLES for policy routing"
    return NetlinkError(f"cannot {action}: {exc.args[1] if len(exc.args) > 1 else exc}", hint=hint)
