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

:func:`check_review` and :func:`node_of_pod` are the pure decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.api.errors import ApiError

from .client import KubeClient
from .errors import KubernetesError
from .kinds import PODS

__all__ = [
    "AUDIENCE",
    "NODE_NAME_CLAIM",
    "POD_NAME_CLAIM",
    "POD_UID_CLAIM",
    "BoundPod",
    "TokenReviewAuthenticator",
    "check_review",
    "node_of_pod",
]

log = logging.getLogger("veil.controller.k8s")

AUDIENCE = "veil"
POD_NAME_CLAIM = "authentication.kubernetes.io/pod-name"
POD_UID_CLAIM = "authentication.kubernetes.io/pod-uid"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"
_TOKEN_HINT = (
    "the node DaemonSet must present its projected ServiceAccount token (audience veil, "
    "mounted from daemonset/node.yaml); the kubelet refreshes it, so re-read the file on retry"
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


def node_of_pod(pod: Mapping[str, Any] | None, bound: BoundPod) -> str:
    """The node the bound pod runs on, after checking the pod is the one the token names."""
    where = f"pod {bound.namespace}/{bound.pod_name}"
    if pod is None:
        raise ApiError(
            "UNAUTHENTICATED",
            f"the token's {where} no longer exists",
            hint="the DaemonSet pod was deleted; its replacement presents its own token",
        )
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
            hint=_TOKEN_HINT,
        )
    sa = spec.get("serviceAccountName") or "default"
    if sa != bound.service_account:
        raise ApiError(
            "UNAUTHENTICATED",
            f"{where} runs as service account {sa}, not {bound.service_account}",
        )
    if status.get("phase") in ("Succeeded", "Failed"):
        raise ApiError("UNAUTHENTICATED", f"{where} has finished ({status.get('phase')})")
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
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._service_account = service_account
        self._audiences = tuple(audiences)

    async def authenticate(self, token: str, claimed_node: str) -> str:
        if not token or len(token) > 16384:
            raise ApiError("UNAUTHENTICATED", "empty or oversized node token", hint=_TOKEN_HINT)
        try:
            review = await self._client.create_token_review(token, self._audiences)
            bound = check_review(review, self._namespace, self._service_account, self._audiences[0])
            pod = await self._client.get_optional(PODS, bound.namespace, bound.pod_name)
        except KubernetesError as e:
            log.error("node authentication could not reach the Kubernetes API: %s", e)
            if e.status in (401, 403):
                raise ApiError(
                    "INTERNAL",
                    f"the controller cannot verify node tokens: {e.message}",
                    hint=e.hint,
                ) from None
            raise ApiError(
                "UNAVAILABLE",
                f"node token could not be verified now: {e.message}",
                hint="the node retries with backoff",
            ) from None
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
