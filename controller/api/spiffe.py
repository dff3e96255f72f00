"""SPIFFE ID parsing and the identity forms Veil uses.

Rules follow the SPIFFE ID specification: scheme ``spiffe``, a trust domain of
lowercase letters, digits, ``.``, ``-`` and ``_``; a path of segments made of
letters, digits, ``.``, ``-`` and ``_``, with no empty, ``.`` or ``..``
segments and no trailing slash; no query, fragment, port or user info; at most
2048 bytes. Identities are compared as exact strings, never as patterns.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from veil.errors import VeilError

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "MAX_SPIFFE_ID_LENGTH",
    "WAYPOINT_PRINCIPAL_PREFIX",
    "InvalidSpiffeId",
    "SpiffeId",
    "channel_identity",
    "channel_principal",
    "node_identity",
    "validate_trust_domain",
    "waypoint_channel_identity",
    "waypoint_principal",
    "workload_identity",
]

DEFAULT_TRUST_DOMAIN = "cluster.local"
MAX_SPIFFE_ID_LENGTH = 2048
_TD_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Kubernetes names (DNS-1123 labels/subdomains) for ns, sa and node names.
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class InvalidSpiffeId(VeilError):
    """A string is not a valid SPIFFE ID, or not of the form Veil expects."""


def validate_trust_domain(td: str) -> str:
    if not td or len(td) > 255 or not _TD_RE.match(td):
        raise InvalidSpiffeId(
            f"invalid trust domain {td!r}",
            hint="use lowercase letters, digits, '.', '-' and '_' only, e.g. cluster.local",
        )
    return td


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID. ``str()`` gives the canonical URI."""

    trust_domain: str
    path: str  # begins with '/', or empty

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        if not isinstance(uri, str) or not uri:
            raise InvalidSpiffeId("empty SPIFFE ID", hint="expected spiffe://<trust-domain>/<path>")
        if len(uri.encode()) > MAX_SPIFFE_ID_LENGTH:
            raise InvalidSpiffeId(
                f"SPIFFE ID is {len(uri.encode())} bytes; the limit is {MAX_SPIFFE_ID_LENGTH}"
            )
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise InvalidSpiffeId(
                f"SPIFFE ID {uri!r} does not start with {prefix!r}",
                hint="the scheme must be lowercase 'spiffe'",
            )
        rest = uri[len(prefix) :]
        if any(c in rest for c in "?#"):
            raise InvalidSpiffeId(f"SPIFFE ID {uri!r} has a query or fragment; neither is allowed")
        td, sep, path = rest.partition("/")
        if "@" in td or ":" in td:
            raise InvalidSpiffeId(f"SPIFFE ID {uri!r} has user info or a port; neither is allowed")
        validate_trust_domain(td)
        path = sep + path
        if path:
            if path.endswith("/"):
                raise InvalidSpiffeId(f"SPIFFE ID {uri!r} has a trailing '/'")
            for seg in path[1:].split("/"):
                if seg in ("", ".", ".."):
                    raise InvalidSpiffeId(
                        f"SPIFFE ID {uri!r} has an empty, '.' or '..' path segment"
                    )
                if not _SEGMENT_RE.match(seg):
                    raise InvalidSpiffeId(
                        f"SPIFFE ID {uri!r} has a path segment {seg!r} with characters "
                        "outside letters, digits, '.', '-' and '_'"
                    )
        return cls(td, path)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def workload(self) -> tuple[str, str] | None:
        """``(namespace, service_account)`` for ``/ns/<ns>/sa/<sa>`` IDs, else None."""
        parts = self.path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    @property
    def node(self) -> str | None:
        """The node name for Veil node identities (``/veil/node/<name>``), else None."""
        parts = self.path.split("/")
        if len(parts) == 4 and parts[1] == "veil" and parts[2] == "node":
            return parts[3]
        return None

    @property
    def waypoint(self) -> tuple[str, str, str] | None:
        """``(namespace, service_account, pod)`` for ``/veil/waypoint/<ns>/<sa>/<pod>``, else None."""
        parts = self.path.split("/")
        if len(parts) == 6 and parts[1] == "veil" and parts[2] == "waypoint":
            return parts[3], parts[4], parts[5]
        return None


def _check_k8s_name(kind: str, value: str) -> None:
    if not _K8S_NAME_RE.match(value):
        raise InvalidSpiffeId(
            f"invalid {kind} {value!r}",
            hint="Kubernetes names are lowercase letters, digits, '-' and '.', starting and "
            "ending with a letter or digit",
        )


@functools.lru_cache(maxsize=16384)
def workload_identity(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """``spiffe://<td>/ns/<ns>/sa/<sa>``, validated.

    Memoised (bounded): the data path asks for the same identities on every
    connection. An invalid input raises every time, since exceptions are not cached.
    """
    validate_trust_domain(trust_domain)
    _check_k8s_name("namespace", namespace)
    _check_k8s_name("service account", service_account)
    return SpiffeId(trust_domain, f"/ns/{namespace}/sa/{service_account}")


def node_identity(trust_domain: str, node: str) -> SpiffeId:
    """``spiffe://<td>/veil/node/<node>``: the identity in a node certificate.

    It can never match a workload principal, so a node certificate is useless
    as a workload identity on an HBONE connection.
    """
    validate_trust_domain(trust_domain)
    _check_k8s_name("node name", node)
    return SpiffeId(trust_domain, f"/veil/node/{node}")


# A waypoint pod joins under a principal name of this form instead of a node
# name. "/" never occurs in a Kubernetes node name, so the two cannot collide.
WAYPOINT_PRINCIPAL_PREFIX = "waypoint/"


def waypoint_principal(namespace: str, service_account: str, pod: str) -> str:
    """``waypoint/<ns>/<sa>/<pod>``: the name a waypoint pod joins and watches under."""
    return f"{WAYPOINT_PRINCIPAL_PREFIX}{namespace}/{service_account}/{pod}"


def waypoint_channel_identity(
    trust_domain: str, namespace: str, service_account: str, pod: str
) -> SpiffeId:
    """``spiffe://<td>/veil/waypoint/<ns>/<sa>/<pod>``: a waypoint pod's channel identity.

    Like a node identity it never matches a workload principal; the service
    account in it is the one identity the controller will sign for its holder.
    """
    validate_trust_domain(trust_domain)
    _check_k8s_name("namespace", namespace)
    _check_k8s_name("service account", service_account)
    _check_k8s_name("pod name", pod)
    return SpiffeId(trust_domain, f"/veil/waypoint/{namespace}/{service_account}/{pod}")


def channel_identity(trust_domain: str, principal: str) -> SpiffeId:
    """The controller-channel identity for a node name or a ``waypoint/<ns>/<sa>/<pod>`` name."""
    if principal.startswith(WAYPOINT_PRINCIPAL_PREFIX):
        parts = principal[len(WAYPOINT_PRINCIPAL_PREFIX) :].split("/")
        if len(parts) != 3:
            raise InvalidSpiffeId(
                f"invalid waypoint principal {principal!r}",
                hint="use waypoint/<namespace>/<service-account>/<pod-name>",
            )
        return waypoint_channel_identity(trust_domain, *parts)
    return node_identity(trust_domain, principal)


def channel_principal(sid: SpiffeId) -> str | None:
    """The node name or waypoint principal a channel identity names, else None."""
    if sid.node is not None:
        return sid.node
    wp = sid.waypoint
    return waypoint_principal(*wp) if wp is not None else None
