"""The waypoint's admin (loopback only) and metrics endpoints (aiohttp).

Admin: ``/config_dump`` (identity, destinations with their endpoints,
policies and JWT issuers, the attached policies and RequestAuthentications in
full, live inbound tunnels, JWKS fetch status, upstream tunnels, in-flight
requests; ``veilctl waypoint`` renders it), ``/healthz/ready``. Metrics: ``/metrics`` and ``/stats/prometheus``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from controller.api.model import ROOT_NAMESPACE, AuthorizationPolicy, RequestAuthentication
from node.policy import l7_terms
from ztunnel.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from .app import Waypoint

__all__ = ["AdminServer"]


def _fields(obj: object, names: tuple[tuple[str, str], ...]) -> dict[str, list[object]]:
    return {key: list(getattr(obj, attr)) for attr, key in names if getattr(obj, attr)}


_SOURCE = (
    ("principals", "principals"),
    ("not_principals", "notPrincipals"),
    ("namespaces", "namespaces"),
    ("not_namespaces", "notNamespaces"),
    ("ip_blocks", "ipBlocks"),
    ("not_ip_blocks", "notIpBlocks"),
    ("request_principals", "requestPrincipals"),
    ("not_request_principals", "notRequestPrincipals"),
)
_OPERATION = (
    ("hosts", "hosts"),
    ("not_hosts", "notHosts"),
    ("methods", "methods"),
    ("not_methods", "notMethods"),
    ("paths", "paths"),
    ("not_paths", "notPaths"),
    ("ports", "ports"),
    ("not_ports", "notPorts"),
)


def _policy_json(p: AuthorizationPolicy) -> dict[str, Any]:
    """An attached policy as veilctl renders it (the ztunnel dump's shape)."""
    rules: list[dict[str, Any]] = []
    for r in p.rules:
        rule: dict[str, Any] = {}
        if r.sources:
            rule["from"] = [{"source": _fields(s, _SOURCE)} for s in r.sources]
        if r.operations:
            rule["to"] = [{"operation": _fields(o, _OPERATION)} for o in r.operations]
        if r.conditions:
            rule["when"] = [
                {"key": c.key, "values": list(c.values), "notValues": list(c.not_values)}
                for c in r.conditions
            ]
        rules.append(rule)
    return {
        "key": p.key,
        "action": p.action.value,
        "selector": dict(p.selector) if p.selector is not None else None,
        "target_refs": [{"kind": t.kind, "name": t.name} for t in p.target_refs],
        "l7_terms": sorted({t for r in p.rules for t in l7_terms(r)}),
        "rules": rules,
    }


def _request_authentication_json(a: RequestAuthentication) -> dict[str, Any]:
    return {
        "key": a.key,
        "target_refs": [{"kind": t.kind, "name": t.name} for t in a.target_refs],
        "selector": dict(a.selector) if a.selector is not None else None,
        "jwt_rules": [
            {
                "issuer": r.issuer,
                "audiences": list(r.audiences),
                "jwks": "inline" if r.jwks else None,
                "jwks_uri": r.jwks_uri or None,
                "from_headers": [{"name": h.name, "prefix": h.prefix} for h in r.from_headers],
                "forward_original_token": r.forward_original_token,
            }
            for r in a.jwt_rules
        ],
    }


class AdminServer:
    def __init__(self, waypoint: Waypoint) -> None:
        self._wp = waypoint
        self._runners: list[web.AppRunner] = []
        self.addresses: dict[str, tuple[str, int]] = {}

    def dump(self) -> dict[str, Any]:
        wp = self._wp
        cert = wp.certs.get(wp.identity)
        view = wp.view
        snap = wp.store.current
        used = {k for d in view.destinations() for k in d.policies.keys}
        used.update(k for _, pset, _ in view.workloads.values() for k in pset.keys)
        policies: list[AuthorizationPolicy] = [snap.policies[k] for k in sorted(used)]
        auths = [
            a
            for a in sorted(snap.request_authentications.values(), key=lambda a: a.key)
            if a.namespace in (view.namespace, ROOT_NAMESPACE)
        ]
        connections = [
            {
                "peer_identity": str(s.request.peer_identity),
                "peer": f"{s.request.peer_addr[0]}:{s.request.peer_addr[1]}",
                "authority": s.request.authority,
                "client": (
                    f"{s.request.forwarded_for[0]}:{s.request.forwarded_for[1]}"
                    if s.request.forwarded_for is not None
                    else None
                ),
                "bytes_up": s.bytes_up,
                "bytes_down": s.bytes_down,
            }
            for s in wp.server.streams()
        ]
        return {
            "waypoint": f"{view.namespace}/{view.name}",
            "identity": str(wp.identity),
            "certificate_not_after": cert.not_after.isoformat() if cert is not None else None,
            "state_version": view.version,
            "destinations": [d.to_json() for d in view.destinations()],
            "workload_destinations": sorted(view.workloads),
            "policies": [_policy_json(p) for p in policies],
            "request_authentications": [_request_authentication_json(a) for a in auths],
            "connections": connections,
            "jwks": [s.to_json() for s in wp.jwks.statuses()],
            "upstream": {**wp.upstream.dump(), **wp.proxy.upstream_h2.dump()},
            "hbone_pool": [str(c) for c in wp.pool.connections()],
            "in_flight": wp.proxy.balancer.in_flight(),
            "tunnels_served": wp.tunnels,
            "requests_served": wp.proxy.served,
            "inbound_streams": len(wp.server.streams()),
        }

    async def _config_dump(self, _request: web.Request) -> web.Response:
        return web.json_response(self.dump())

    async def _ready(self, _request: web.Request) -> web.Response:
        wp = self._wp
        problems = []
        if not wp.store.current.synced:
            problems.append("no state from the controller yet")
        if wp.certs.get(wp.identity) is None:
            problems.append("no certificate yet")
        if problems:
            return web.Response(status=503, text="; ".join(problems) + "\n")
        return web.Response(text="ready\n")

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self._wp.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def _serve(self, name: str, app: web.Application, address: tuple[str, int]) -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, address[0], address[1], reuse_address=True)
        await site.start()
        self._runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname() if sockets else address
        self.addresses[name] = (str(bound[0]), int(bound[1]))

    async def start(self) -> None:
        admin = web.Application()
        admin.router.add_get("/config_dump", self._config_dump)
        admin.router.add_get("/healthz/ready", self._ready)
        metrics = web.Application()
        metrics.router.add_get("/metrics", self._metrics)
        metrics.router.add_get("/stats/prometheus", self._metrics)
        await self._serve("admin", admin, self._wp.config.admin_address)
        await self._serve("metrics", metrics, self._wp.config.metrics_address)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
