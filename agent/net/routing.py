"""Policy routing that delivers steered packets locally, for IPv4 and IPv6.

bpf_sk_assign() only attaches a socket to the packet; the packet still has
to be routed to local input. The programs mark every steered packet with
MARK_REDIRECT, and::

    ip rule add fwmark MARK_REDIRECT/MARK_MASK lookup ROUTE_TABLE priority RULE_PRIORITY
    ip route add local 0.0.0.0/0 dev lo table ROUTE_TABLE
    ip -6 rule add fwmark MARK_REDIRECT/MARK_MASK lookup ROUTE_TABLE priority RULE_PRIORITY
    ip -6 route add local ::/0 dev lo table ROUTE_TABLE

make any marked packet local, whatever its destination address. All four
are installed idempotently and removed by uninstall. A namespace with IPv6
switched off (no IPv6 address at all, not even ::1 on lo) carries no IPv6 to
steer and cannot hold the IPv6 route: there the IPv6 half is skipped and
reported as not needed. The numbers come from node/dataplane.py.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any, Final

from pyroute2.netlink.exceptions import NetlinkError as PyrNetlinkError

from agent.errors import NetlinkError
from node.dataplane import MARK_MASK, MARK_REDIRECT, ROUTE_TABLE, RULE_PRIORITY

__all__ = ["PolicyRouting", "ensure_policy_routing", "policy_routing", "remove_policy_routing"]

_RTN_LOCAL = 2
_RT_SCOPE_HOST = 254
_DEFAULT: Final[dict[int, str]] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


@dataclass(frozen=True)
class PolicyRouting:
    """Whether the fwmark rules and the local routes are in place (per family)."""

    rule: bool
    route: bool
    rule6: bool = False
    route6: bool = False
    # False: IPv6 is off in this namespace, so the IPv6 half is not needed.
    ipv6_enabled: bool = True

    @property
    def complete(self) -> bool:
        return self.rule and self.route and (self.complete6 or not self.ipv6_enabled)

    @property
    def complete6(self) -> bool:
        return self.rule6 and self.route6


def _our_rules(ipr: Any, family: int = socket.AF_INET) -> list[Any]:
    found = []
    for msg in ipr.get_rules(family=family):
        table = msg.get_attr("FRA_TABLE") or msg["table"]
        if (
            msg.get_attr("FRA_PRIORITY") == RULE_PRIORITY
            and msg.get_attr("FRA_FWMARK") == MARK_REDIRECT
            and msg.get_attr("FRA_FWMASK") == MARK_MASK
            and table == ROUTE_TABLE
        ):
            found.append(msg)
    return found


def _our_routes(ipr: Any, family: int = socket.AF_INET) -> list[Any]:
    return [
        msg
        for msg in ipr.get_routes(family=family, table=ROUTE_TABLE)
        if msg["type"] == _RTN_LOCAL and msg["dst_len"] == 0
    ]


def _ipv6_enabled(ipr: Any) -> bool:
    """IPv6 is on when any interface holds an IPv6 address (lo has ::1 unless it is off)."""
    return bool(ipr.get_addr(family=socket.AF_INET6))


def _families(ipr: Any) -> tuple[int, ...]:
    if _ipv6_enabled(ipr):
        return (socket.AF_INET, socket.AF_INET6)
    return (socket.AF_INET,)


def policy_routing(ipr: Any) -> PolicyRouting:
    try:
        v6 = _ipv6_enabled(ipr)
        return PolicyRouting(
            rule=bool(_our_rules(ipr)),
            route=bool(_our_routes(ipr)),
            rule6=v6 and bool(_our_rules(ipr, socket.AF_INET6)),
            route6=v6 and bool(_our_routes(ipr, socket.AF_INET6)),
            ipv6_enabled=v6,
        )
    except PyrNetlinkError as exc:
        raise _error(exc, "read the policy routing state") from exc


def ensure_policy_routing(ipr: Any) -> None:
    """Install the rules and the local routes unless present (both families)."""
    try:
        families = _families(ipr)
        lo = ipr.link_lookup(ifname="lo")[0]
    except PyrNetlinkError as exc:
        raise _error(exc, "read links and addresses") from exc
    for family in families:
        try:
            ipr.route(
                "replace",
                family=family,
                dst=_DEFAULT[family],
                type=_RTN_LOCAL,
                scope=_RT_SCOPE_HOST,
                oif=lo,
                table=ROUTE_TABLE,
            )
            if not _our_rules(ipr, family):
                ipr.rule(
                    "add",
                    family=family,
                    fwmark=MARK_REDIRECT,
                    fwmask=MARK_MASK,
                    table=ROUTE_TABLE,
                    priority=RULE_PRIORITY,
                )
        except PyrNetlinkError as exc:
            if exc.code == errno.EEXIST:
                continue
            raise _error(exc, f"install the {_name(family)} fwmark rule and local route") from exc


def remove_policy_routing(ipr: Any) -> None:
    """Remove the rules and the routes of both families (idempotent)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            for _ in range(8):  # duplicates, if someone added the rule twice; bounded
                if not _our_rules(ipr, family):
                    break
                ipr.rule(
                    "del",
                    family=family,
                    fwmark=MARK_REDIRECT,
                    fwmask=MARK_MASK,
                    table=ROUTE_TABLE,
                    priority=RULE_PRIORITY,
                )
            for msg in _our_routes(ipr, family):
                ipr.route(
                    "del",
                    family=family,
                    dst=_DEFAULT[family],
                    type=_RTN_LOCAL,
                    scope=_RT_SCOPE_HOST,
                    table=ROUTE_TABLE,
                    oif=msg.get_attr("RTA_OIF"),
                )
        except PyrNetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH, errno.EAFNOSUPPORT):
                continue
            raise _error(exc, f"remove the {_name(family)} fwmark rule and local route") from exc


def _name(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def _error(exc: PyrNetlinkError, action: str) -> NetlinkError:
    hint = "the agent needs CAP_NET_ADMIN in the node's network namespace"
    if exc.code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
        hint = (
            "the kernel needs CONFIG_IP_MULTIPLE_TABLES (and CONFIG_IPV6_MULTIPLE_TABLES "
            "for IPv6) for policy routing"
        )
    return NetlinkError(f"cannot {action}: {exc.args[1] if len(exc.args) > 1 else exc}", hint=hint)
