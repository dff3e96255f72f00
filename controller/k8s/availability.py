"""Whether a watched kind can be read, and if not, why: discovery and failure causes.

Two decisions live here, both small and mostly pure:

* :func:`resolve_version`: ask the API server which versions of a kind's group
  it serves and pick the newest one Veil understands (EndpointSlice ``v1``, else
  ``v1beta1``), as client-go based controllers do through discovery;
* :func:`classify_failure`: turn a failed list or watch into a
  :class:`KindFailure` that names the real cause (the group/version the server
  lacks, or the RBAC verb and resource the controller is missing) and what to do,
  or None while a failure may still be transient (a single 5xx, a dropped
  connection).

The reflector records the result; the source reports it on the health endpoint
and in ``veil controller status``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .client import KubeClient
from .errors import KubernetesError
from .kinds import CRD_GROUP, ResourceKind, understood_versions

__all__ = [
    "FORBIDDEN_STREAK",
    "SERVER_ERROR_STREAK",
    "KindFailure",
    "classify_failure",
    "resolve_version",
]

# This many failed calls in a row without an answer (5xx, refused, timed out)
# make a kind "failed" rather than "still trying": one 503 during an API server
# rollout is normal, three in a row with backoff between them is not.
SERVER_ERROR_STREAK = 3
# A 403 counts from the second in a row: a kube-apiserver that has just
# restarted answers 403 for a second or so until its RBAC cache has loaded
# (seen on 1.20 in tests/k8s_real), and that is no reason to page anyone.
FORBIDDEN_STREAK = 2

_RBAC_FILE = "daemonset/rbac.yaml"


@dataclass(frozen=True, slots=True)
class KindFailure:
    """Why a kind cannot be read right now; ``cause`` and ``hint`` are for people."""

    kind: str  # plural, e.g. "endpointslices"
    verb: str  # list, watch or discover
    status: int
    cause: str
    hint: str


def _group_name(kind: ResourceKind) -> str:
    return kind.group or 'the core group ""'


def not_served(kind: ResourceKind, offered: tuple[str, ...]) -> KubernetesError:
    """The error for a group/version the server does not offer."""
    wanted = understood_versions(kind)
    choices = " or ".join(f"{kind.group}/{v}" if kind.group else v for v in wanted)
    have = ", ".join(offered) if offered else "none"
    if kind.group == CRD_GROUP:
        hint = "install the Veil CRDs: kubectl apply -k daemonset/"
    else:
        hint = (
            f"Veil reads {kind.plural} as {choices}; use a Kubernetes version that serves "
            "one of them"
        )
    return KubernetesError(
        f"the API server does not serve {choices} {kind.plural} "
        f"(versions of {_group_name(kind)} offered: {have})",
        status=404,
        reason="NotFound",
        hint=hint,
    )


async def resolve_version(client: KubeClient, kind: ResourceKind) -> ResourceKind:
    """``kind`` at the newest version the server serves; raises KubernetesError(404) if none."""
    if not kind.group:
        return kind  # the core group is v1 on every server Veil supports
    offered = await client.served_versions(kind.group)
    for version in understood_versions(kind):
        if version in offered:
            return dataclasses.replace(kind, version=version)
    raise not_served(kind, offered)


def classify_failure(
    kind: ResourceKind, verb: str, err: KubernetesError, streak: int
) -> KindFailure | None:
    """The cause of a failed ``verb`` on ``kind``, or None while it may be transient.

    ``streak`` counts consecutive failures of this kind without a success between.
    """
    what = f"{kind.plural}" + (f".{kind.group}" if kind.group else "")
    if err.status == 403:
        if streak < FORBIDDEN_STREAK:
            return None
        return KindFailure(
            kind.plural,
            verb,
            403,
            f"forbidden by RBAC: the controller may not {verb} {what} (verb {verb!r} on "
            f"resource {kind.plural!r} in API group {kind.group!r}); the server said: "
            f"{err.message}",
            f"grant verb {verb!r} on {kind.plural!r} (apiGroups [{kind.group!r}]) to the "
            f"ClusterRole veil-controller ({_RBAC_FILE}; kubectl apply -k daemonset/)",
        )
    if err.status == 404:
        if err.reason == "NotFound" and "does not serve" in err.message:
            cause = err.message
        else:
            cause = f"the API server does not serve {kind.api_version} {kind.plural}: {err.message}"
        return KindFailure(kind.plural, verb, 404, cause, err.hint or "")
    if err.status == 401:
        return KindFailure(
            kind.plural,
            verb,
            401,
            f"the API server refused the controller's token: {err.message}",
            err.hint or "",
        )
    if err.status >= 400 and err.status < 500 and err.status not in (410, 429):
        return KindFailure(kind.plural, verb, err.status, err.message, err.hint or "")
    if streak >= SERVER_ERROR_STREAK and (err.status == 0 or err.status >= 500):
        return KindFailure(
            kind.plural,
            verb,
            err.status,
            f"{verb} {what} failed {streak} times in a row: {err.message}",
            err.hint or "check the API server's health and logs",
        )
    return None
