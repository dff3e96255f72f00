"""Node authentication in Kubernetes: projected ServiceAccount tokens and TokenReview.

The node DaemonSet pod presents its projected token (audience ``veil``) to
Identity.JoinNode. :class:`TokenReviewAuthenticator` implements
:class:`controller.auth.NodeAuthenticator`:

1. TokenReview (authentication.k8s.io/v1, ``spec.audiences=["veil"]``): the API
   server checks the signature, expiry, audience and that the bound pod still
   exists. A token for another audience (say, the API server's own) is refused,
   so a stolen default token cannot join a node.
2. The user must be the Veil node ServiceAccount
   (``system:serviceaccount:veil-system:veil-node``).
3. The token must be bound to a pod (``authentication.kubernetes.io/pod-name`` and
   ``pod-uid`` in ``user.extra``): legacy Secret-based tokens are not accepted.
4. That pod is read back: same uid (not a new pod reusing the name), same
   ServiceAccount, not finished; its ``spec.nodeName`` is the node. A
   ``node-name`` claim, when the API server adds one, must agree.
5. The node the caller claims must be that node.

Waypoint pods join through the same RPC with a narrower grant. A token of any
other ServiceAccount is admitted only when its bound pod (same uid, same
ServiceAccount, not finished) carries ``veil.io/waypoint=<name>`` and its
namespace, or a Service in it, is labelled ``veil.io/use-waypoint=<name>``, or
some Namespace or Service elsewhere names it with ``veil.io/use-waypoint=<name>``
and ``veil.io/use-waypoint-namespace=<its namespace>``. The principal is then
``waypoint/<ns>/<sa>/<pod>``, not a node, and the
caller must have claimed exactly that; controller.identity lets it obtain only
``spiffe://<td>/ns/<ns>/sa/<sa>``.

:func:`check_review`, :func:`node_of_pod` and :func:`waypoint_of_pod` are the
pure decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.api.errors import ApiError
from controller.api.spiffe import InvalidSpiffeId, waypoint_channel_identity, waypoint_principal

from .client import KubeClient
from .errors import KubernetesError
from .kinds import NAMESPACES, PODS, SERVICES

__all__ = [
    "AUDIENCE",
    "NODE_NAME_CLAIM",
    "POD_NAME_CLAIM",
    "POD_UID_CLAIM",
    "USE_WAYPOINT_LABEL",
    "USE_WAYPOINT_NAMESPACE_LABEL",
    "WAYPOINT_LABEL",
    "BoundPod",
    "TokenReviewAuthenticator",
    "check_review",
    "node_of_pod",
    "service_account_of",
    "waypoint_of_pod",
    "waypoint_ref_of",
]

log = logging.getLogger("veil.controller.k8s")

AUDIENCE = "veil"
POD_NAME_CLAIM = "authentication.kubernetes.io/pod-name"
POD_UID_CLAIM = "authentication.kubernetes.io/pod-uid"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"
WAYPOINT_LABEL = "veil.io/waypoint"
USE_WAYPOINT_LABEL = "veil.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "veil.io/use-waypoint-namespace"
_SA_USER_PREFIX = "system:serviceaccount:"
_WAYPOINT_HINT = (
    "a waypoint pod needs the label veil.io/waypoint=<name>, and its namespace or a Service "
    "in it the label veil.io/use-waypoint=<name> (daemonset/waypoint/, docs/waypoint.md)"
)
_TOKEN_HINT = (
    "present the pod's projected ServiceAccount token (audience veil, mounted by "
    "daemonset/node.yaml for nodes, daemonset/waypoint/ for waypoints); the kubelet refreshes "
    "it, so re-read the file on retry; a deleted pod's token stays invalid, its replacement "
    "joins with its own"
)


@dataclass(frozen=True, slots=True)
class BoundPod:
    """What a verified token says about its holder."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str
    node_claim: str  # "" when the API server does not add the node-name claim


def _one(extra: Mapping[str, Any], key: str) -> str:
    values = extra.get(key)
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return ""


def check_review(
    review: Mapping[str, Any], namespace: str, service_account: str, audience: str = AUDIENCE
) -> BoundPod:
    """The bound pod from a TokenReview answer, or ApiError saying why the token is refused."""
    status = review.get("status")
    status = status if isinstance(status, Mapping) else {}
    if status.get("authenticated") is not True:
        reason = str(status.get("error") or "the token was not authenticated")
        raise ApiError(
            "UNAUTHENTICATED",
            f"node token refused by the Kubernetes API: {reason}",
            hint=_TOKEN_HINT,
        )
    audiences = status.get("audiences")
    if isinstance(audiences, list) and audience not in audiences:
        raise ApiError(
            "UNAUTHENTICATED",
            f"node token is for audiences {audiences}, not {audience!r}",
            hint=_TOKEN_HINT,
        )
    user = status.get("user")
    user = user if isinstance(user, Mapping) else {}
    username = str(user.get("username") or "")
    expected = f"system:serviceaccount:{namespace}:{service_account}"
    if username != expected:
        raise ApiError(
            "UNAUTHENTICATED",
            f"token belongs to {username or 'an unnamed user'}, not the Veil node service account "
            f"{expected}",
            hint="only the veil-node DaemonSet may join nodes",
        )
    extra = user.get("extra")
    extra = extra if isinstance(extra, Mapping) else {}
    pod_name, pod_uid = _one(extra, POD_NAME_CLAIM), _one(extra, POD_UID_CLAIM)
    if not pod_name or not pod_uid:
        raise ApiError(
            "UNAUTHENTICATED",
            "node token is not bound to a pod (no pod-name/pod-uid claims); legacy "
            "ServiceAccount token Secrets are not accepted",
            hint=_TOKEN_HINT,
        )
    return BoundPod(namespace, service_account, pod_name, pod_uid, _one(extra, NODE_NAME_CLAIM))


def service_account_of(review: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(namespace, name)`` of the ServiceAccount a TokenReview answer names, else None."""
    status = review.get("status")
    user = status.get("user") if isinstance(status, Mapping) else None
    username = user.get("username") if isinstance(user, Mapping) else None
    if not isinstance(username, str) or not username.startswith(_SA_USER_PREFIX):
        return None
    namespace, sep, name = username[len(_SA_USER_PREFIX) :].partition(":")
    return (namespace, name) if sep and namespace and name else None


def _labels(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return labels if isinstance(labels, Mapping) else {}


def waypoint_ref_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(namespace, name)`` of the waypoint a Namespace or Service object opts into.

    ``veil.io/use-waypoint`` names the waypoint; ``veil.io/use-waypoint-namespace``
    its namespace, by default the object's own (a Namespace's name, a
    Service's namespace). None when the object opts into no waypoint.
    """
    labels = _labels(obj)
    name = labels.get(USE_WAYPOINT_LABEL)
    if not isinstance(name, str) or not name:
        return None
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    # A Namespace is cluster-scoped: no metadata.namespace, its own name instead.
    own = meta.get("namespace") or meta.get("name")
    target = labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or own
    return (target, name) if isinstance(target, str) and target else None


def _live_bound_pod(
    pod: Mapping[str, Any] | None, bound: BoundPod, *, gone_hint: str | None, uid_hint: str | None
) -> Mapping[str, Any]:
    """The pod's spec after checking it is the live pod the token names (same
    uid and service account, not finished); raises ApiError UNAUTHENTICATED."""
    where = f"pod {bound.namespace}/{bound.pod_name}"
    if pod is None:
        raise ApiError("UNAUTHENTICATED", f"the token's {where} no longer exists", hint=gone_hint)
    meta = pod.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    spec = pod.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    status = pod.get("status")
    status = status if isinstance(status, Mapping) else {}
    if meta.get("uid") != bound.pod_uid:
        raise ApiError(
            "UNAUTHENTICATED",
            f"the token was issued to an earlier {where} (uid {bound.pod_uid}, now "
            f"{meta.get('uid')})",
            hint=uid_hint,
        )
    sa = spec.get("serviceAccountName") or "default"
    if sa != bound.service_account:
        raise ApiError(
            "UNAUTHENTICATED", f"{where} runs as service account {sa}, not {bound.service_account}"
        )
    if status.get("phase") in ("Succeeded", "Failed"):
        raise ApiError("UNAUTHENTICATED", f"{where} has finished ({status.get('phase')})")
    return spec


def waypoint_of_pod(pod: Mapping[str, Any] | None, bound: BoundPod) -> str:
    """The waypoint name the bound pod serves (its ``veil.io/waypoint`` label).

    Raises ApiError: UNAUTHENTICATED when the pod is not the one the token
    names, PERMISSION_DENIED when it is a genuine pod that is not a waypoint.
    """
    _live_bound_pod(pod, bound, gone_hint=None, uid_hint=None)
    assert pod is not None
    name = _labels(pod).get(WAYPOINT_LABEL)
    if not isinstance(name, str) or not name:
        raise ApiError(
            "PERMISSION_DENIED",
            f"pod {bound.namespace}/{bound.pod_name} (service account "
            f"{bound.namespace}/{bound.service_account}) may not join: "
            f"it is neither the Veil node DaemonSet nor a waypoint (no {WAYPOINT_LABEL} label)",
            hint=_WAYPOINT_HINT,
        )
    return name


def node_of_pod(pod: Mapping[str, Any] | None, bound: BoundPod) -> str:
    """The node the bound pod runs on, after checking the pod is the one the token names."""
    spec = _live_bound_pod(
        pod,
        bound,
        gone_hint="the DaemonSet pod was deleted; its replacement presents its own token",
        uid_hint=_TOKEN_HINT,
    )
    where = f"pod {bound.namespace}/{bound.pod_name}"
    node = spec.get("nodeName")
    if not isinstance(node, str) or not node:
        raise ApiError("UNAUTHENTICATED", f"{where} is not scheduled to a node")
    if bound.node_claim and bound.node_claim != node:
        raise ApiError(
            "UNAUTHENTICATED",
            f"the token says node {bound.node_claim} but {where} runs on {node}",
        )
    return node


class TokenReviewAuthenticator:
    """:class:`controller.auth.NodeAuthenticator` for projected ServiceAccount tokens."""

    def __init__(
        self,
        client: KubeClient,
        *,
        namespace: str = "veil-system",
        service_account: str = "veil-node",
        audiences: Sequence[str] = (AUDIENCE,),
        admit_waypoints: bool = True,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._service_account = service_account
        self._audiences = tuple(audiences)
        self._admit_waypoints = admit_waypoints

    async def authenticate(self, token: str, claimed_node: str) -> str:
        if not token or len(token) > 16384:
            raise ApiError("UNAUTHENTICATED", "empty or oversized node token", hint=_TOKEN_HINT)
        try:
            review = await self._client.create_token_review(token, self._audiences)
            who = service_account_of(review)
            if (
                self._admit_waypoints
                and who is not None
                and who != (self._namespace, self._service_account)
            ):
                return await self._waypoint(review, who, claimed_node)
            bound = check_review(review, self._namespace, self._service_account, self._audiences[0])
            pod = await self._client.get_optional(PODS, bound.namespace, bound.pod_name)
        except KubernetesError as e:
            raise _api_unreachable(e) from None

        node = node_of_pod(pod, bound)
        if claimed_node and claimed_node != node:
            raise ApiError(
                "UNAUTHENTICATED",
                f"the token belongs to pod {bound.namespace}/{bound.pod_name} on node {node}, "
                f"not node {claimed_node}",
                hint="the DaemonSet passes its own node name (spec.nodeName) when joining",
            )
        log.info("node %s authenticated by pod %s/%s", node, bound.namespace, bound.pod_name)
        return node

    async def _waypoint(self, review: Mapping[str, Any], who: tuple[str, str], claimed: str) -> str:
        """The principal ``waypoint/<ns>/<sa>/<pod>`` for an admitted waypoint pod's token."""
        bound = check_review(review, who[0], who[1], self._audiences[0])
        pod = await self._client.get_optional(PODS, bound.namespace, bound.pod_name)
        try:
            name = waypoint_of_pod(pod, bound)
        except ApiError as e:
            # Say both why it is not a node and why it is not a waypoint.
            raise ApiError(
                e.code,
                f"token belongs to system:serviceaccount:{who[0]}:{who[1]}, not the Veil node "
                f"service account system:serviceaccount:{self._namespace}:"
                f"{self._service_account}, and it is not an admitted waypoint: {e.message}",
                hint=e.hint or _WAYPOINT_HINT,
            ) from None
        if not await self._opted_in(bound.namespace, name):
            raise ApiError(
                "PERMISSION_DENIED",
                f"waypoint {name!r} (pod {bound.namespace}/{bound.pod_name}) may not join: neither "
                f"namespace {bound.namespace} nor a Service in it is labelled "
                f"{USE_WAYPOINT_LABEL}={name}, and no Namespace or Service elsewhere names it "
                f"with {USE_WAYPOINT_LABEL}={name} and "
                f"{USE_WAYPOINT_NAMESPACE_LABEL}={bound.namespace}",
                hint=f"kubectl label namespace {bound.namespace} {USE_WAYPOINT_LABEL}={name}; "
                f"from another namespace, also {USE_WAYPOINT_NAMESPACE_LABEL}={bound.namespace}",
            )
        try:
            # Validates the names as they will appear in the channel certificate.
            waypoint_channel_identity("veil.invalid", *who, bound.pod_name)
        except InvalidSpiffeId as e:
            raise ApiError("PERMISSION_DENIED", e.message, hint=e.hint) from None
        principal = waypoint_principal(bound.namespace, bound.service_account, bound.pod_name)
        if claimed != principal:
            raise ApiError(
                "UNAUTHENTICATED",
                f"the token belongs to waypoint pod {bound.namespace}/{bound.pod_name}, which "
                f"joins as {principal!r}, not {claimed!r}",
                hint="join with --node waypoint/<namespace>/<service-account>/<pod-name>",
            )
        log.info("waypoint %s admitted as %s", name, principal)
        return principal

    async def _opted_in(self, namespace: str, name: str) -> bool:
        """Whether some Namespace or Service sends traffic to waypoint ``name`` of ``namespace``.

        The waypoint's own namespace and its Services are read first (the
        common case); then every Namespace and Service, for one that names
        this waypoint from elsewhere with ``veil.io/use-waypoint-namespace``.
        Joins are rare, so the cluster-wide lists cost little.
        """
        me = (namespace, name)
        ns = await self._client.get_optional(NAMESPACES, None, namespace)
        if ns is not None and waypoint_ref_of(ns) == me:
            return True
        services, _ = await self._client.list(SERVICES, namespace)
        if any(waypoint_ref_of(svc) == me for svc in services):
            return True
        for kind in (NAMESPACES, SERVICES):
            objects, _ = await self._client.list(kind)
            if any(waypoint_ref_of(obj) == me for obj in objects):
                return True
        return False


def _api_unreachable(e: KubernetesError) -> ApiError:
    log.error("node authentication could not reach the Kubernetes API: %s", e)
    if e.status in (401, 403):
        return ApiError(
            "INTERNAL", f"the controller cannot verify node tokens: {e.message}", hint=e.hint
        )
    return ApiError(
        "UNAVAILABLE",
        f"node token could not be verified now: {e.message}",
        hint="the node retries with backoff",
    )
