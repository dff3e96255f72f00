"""Node authentication for Identity.JoinNode.

:class:`NodeAuthenticator` is the pluggable contract; :class:`JoinTokenStore` is
the standalone implementation (single-use, expiring join tokens bound to a node
name and carrying the CA fingerprint, stored hashed).
"""

from __future__ import annotations

from controller.api.token import TOKEN_PREFIX, JoinToken

from .protocol import NodeAuthenticator
from .token_store import DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL, JoinTokenStore, TokenInfo

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "MAX_TOKEN_TTL",
    "TOKEN_PREFIX",
    "JoinToken",
    "JoinTokenStore",
    "NodeAuthenticator",
    "TokenInfo",
]
