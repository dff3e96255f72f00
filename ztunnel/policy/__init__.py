"""L4 policy decisions: AuthorizationPolicy evaluation and PeerAuthentication modes.

Everything here is pure over immutable snapshots; :class:`PolicyEngine` only
binds the functions to the state store for the proxy.
"""

from .engine import Connection, PolicyEngine, Verdict, authorize, evaluate, plaintext_verdict
from .match import (
    CompiledPolicy,
    ConnectionFacts,
    compile_policy,
    parse_ip_block,
    policy_matches,
    principal_text,
    string_matches,
)
from .peer_auth import DEFAULT_MODE, effective_mode, mode_source

__all__ = [
    "DEFAULT_MODE",
    "CompiledPolicy",
    "Connection",
    "ConnectionFacts",
    "PolicyEngine",
    "Verdict",
    "authorize",
    "compile_policy",
    "effective_mode",
    "evaluate",
    "mode_source",
    "parse_ip_block",
    "plaintext_verdict",
    "policy_matches",
    "principal_text",
    "string_matches",
]
