"""The node authenticator contract used by Identity.JoinNode.

Standalone mode uses join tokens (:class:`controller.auth.JoinTokenStore`);
Kubernetes mode will verify projected ServiceAccount tokens with TokenReview.
Both answer the same question: given the credential a node presented and the
node name it claims, which node is it really?
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NodeAuthenticator"]


class NodeAuthenticator(Protocol):
    async def authenticate(self, token: str, claimed_node: str) -> str:
        """Returns the verified node name, or raises ApiError("UNAUTHENTICATED", ...).

        Implementations must refuse when ``claimed_node`` differs from the node
        the credential was issued for.
        """
        ...
