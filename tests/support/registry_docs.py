"""Registry documents for test meshes: workloads, policies and peer authentication.

The ``veil controller run`` YAML shape, as plain dicts; the loopback proxy
tests build their meshes from these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["allow_from", "mesh_doc", "peer_auth", "workload"]


def workload(
    name: str, namespace: str, node: str, ip: str, sa: str | None = None, **labels: str
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "serviceAccount": sa or name,
        "node": node,
        "ips": [ip],
        "labels": {"app": name, **labels},
    }


def allow_from(
    name: str, app: str, principals: list[str], namespace: str = "shop"
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": principals}}]}],
        },
    }


def peer_auth(mode: str, namespace: str = "shop") -> dict[str, Any]:
    return {"name": "default", "namespace": namespace, "spec": {"mtls": {"mode": mode}}}


def mesh_doc(
    workloads: list[dict[str, Any]],
    *,
    policies: Sequence[dict[str, Any]] = (),
    peer_auths: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A registry: namespace ``shop`` enrolled, ``legacy`` not."""
    return {
        "trustDomain": "cluster.local",
        "namespaces": [
            {"name": "shop", "labels": {"veil.io/dataplane-mode": "ambient"}},
            {"name": "legacy"},
        ],
        "workloads": workloads,
        "authorizationPolicies": list(policies),
        "peerAuthentications": list(peer_auths),
    }
