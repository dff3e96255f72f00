"""``veilctl waypoint``: a waypoint's destinations, policies and live tunnels.

Reads the waypoint's ``/config_dump`` (its admin API, loopback only, default
127.0.0.1:15000 in the waypoint's network namespace) and renders what an SRE
asks first: which destinations it serves and with which endpoints, which
AuthorizationPolicies and JWT issuers apply, and which tunnels are open.
``-o json`` / ``-o yaml`` print the dump itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, TextIO

from agent.cli.output import Column, dump_data, render
from agent.cli.rows import policy_rows
from agent.cli.sources import Unreachable
from agent.status.client import Endpoint, StatusUnavailable
from veil.errors import VeilError

__all__ = ["DEFAULT_WAYPOINT_ADMIN", "cmd_waypoint", "waypoint_dump"]

DEFAULT_WAYPOINT_ADMIN = "127.0.0.1:15000"


def waypoint_dump(admin: str, timeout: float = 5.0) -> Mapping[str, Any]:
    host, _, port = admin.rpartition(":")
    if not host or not port.isdigit():
        raise VeilError(f"--admin {admin!r} is not HOST:PORT", hint="e.g. 127.0.0.1:15000")
    endpoint = Endpoint(
        "the waypoint admin API",
        f"is the waypoint running (admin API {admin})? Run veilctl in the waypoint's "
        "network namespace, or pass --admin",
        host=host.strip("[]"),
        port=int(port),
        timeout=timeout,
    )
    try:
        dump = endpoint.get("/config_dump")
    except StatusUnavailable as exc:
        if exc.message.startswith("cannot reach"):
            raise Unreachable("waypoint", exc.message, hint=exc.hint) from None
        raise
    if not isinstance(dump, Mapping) or "waypoint" not in dump:
        raise VeilError(
            f"{admin} answered, but not with a waypoint's config dump",
            hint="is that a ztunnel's admin port? use veilctl policies / connections for it",
        )
    return dump


def cmd_waypoint(_src: Any, args: argparse.Namespace, out: TextIO) -> int:
    dump = waypoint_dump(args.admin)
    if args.output != "table":
        dump_data(dict(dump), args.output, out)
        return 0
    out.write(
        f"waypoint {dump.get('waypoint')}  identity {dump.get('identity')}  "
        f"certificate until {dump.get('certificate_not_after') or '(none yet)'}  "
        f"state version {dump.get('state_version')}\n\n"
    )
    dests = [
        {
            "destination": d.get("destination"),
            "endpoints": ", ".join(d.get("endpoints") or []) or "(none ready: 503)",
            "policies": ", ".join(d.get("policies") or []) or "(none: allow)",
            "jwt": ", ".join(d.get("jwt_issuers") or []) or "-",
        }
        for d in dump.get("destinations") or []
    ]
    render(
        dests,
        (
            Column("DESTINATION", "destination"),
            Column("ENDPOINTS", "endpoints"),
            Column("POLICIES", "policies"),
            Column("JWT ISSUERS", "jwt"),
        ),
        "table",
        out,
        empty="(no destinations use this waypoint)",
    )
    out.write("\n")
    render(
        policy_rows(dump.get("policies") or []),
        (
            Column("POLICY", "policy"),
            Column("ACTION", "action"),
            Column("ATTACHED", "l7"),
            Column("RULES", "rules"),
        ),
        "table",
        out,
        empty="(no attached authorization policies)",
    )
    out.write("\n")
    conns = [
        {
            "peer": c.get("peer_identity"),
            "client": c.get("client") or c.get("peer"),
            "authority": c.get("authority"),
            "bytes": f"{c.get('bytes_up', 0)}/{c.get('bytes_down', 0)}",
        }
        for c in dump.get("connections") or []
    ]
    render(
        conns,
        (
            Column("PEER IDENTITY", "peer"),
            Column("CLIENT", "client"),
            Column("AUTHORITY", "authority"),
            Column("BYTES(UP/DOWN)", "bytes"),
        ),
        "table",
        out,
        empty="(no open tunnels)",
    )
    out.write(
        f"\nrequests served {dump.get('requests_served')}, in flight "
        f"{dump.get('in_flight')}, tunnels served {dump.get('tunnels_served')}\n"
    )
    return 0
