"""The Kubernetes source's error family.

Everything the Kubernetes API answers with other than success becomes a
:class:`KubernetesError` at one boundary (:mod:`controller.k8s.client`), carrying
the HTTP status and the API's ``Status.reason`` so callers branch on values
(``err.gone``, ``err.conflict``) rather than on exception types from aiohttp or
kubernetes_asyncio.
"""

from __future__ import annotations

from controller.errors import ControllerError

__all__ = ["KubernetesError"]

_HINTS = {
    401: "the controller's ServiceAccount token was refused; check the token is mounted "
    "and not expired",
    403: "the controller's ServiceAccount lacks a permission; apply daemonset/rbac.yaml "
    "(kubectl apply -k daemonset/)",
    # Deliberately no guess at the cause: a missing kind is diagnosed by API
    # discovery (controller.k8s.availability), which names the group/version.
    404: "the object does not exist, or this API server does not serve its type",
    429: "the API server is throttling; the controller retries with backoff",
}


class KubernetesError(ControllerError):
    """A Kubernetes API call failed.

    ``status`` is the HTTP status (0 when no response arrived: connection refused,
    reset or timed out); ``reason`` is the API's machine-readable reason
    (``NotFound``, ``Conflict``, ``Expired``...), empty when unknown.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        reason: str = "",
        hint: str | None = None,
    ) -> None:
        if hint is None:
            hint = _HINTS.get(status)
            if hint is None and (status == 0 or status >= 500):
                hint = (
                    "the API server is unreachable or failing; the controller retries with backoff"
                )
        super().__init__(message, hint=hint)
        self.status = status
        self.reason = reason

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """409: a create found the object, or an update carried a stale resourceVersion."""
        return self.status == 409

    @property
    def gone(self) -> bool:
        """410: the resourceVersion is too old (compacted); the caller must relist."""
        return self.status == 410

    @property
    def transient(self) -> bool:
        """Worth retrying unchanged: no response, throttled, or a server-side failure."""
        return self.status == 0 or self.status == 429 or self.status >= 500
