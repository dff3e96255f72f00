"""The pure L4 policy model every node process shares.

AuthorizationPolicy compilation and matching (:mod:`.match`), evaluation in
Istio's order (:mod:`.authz`) and the effective PeerAuthentication mode
(:mod:`.peer_auth`). Pure functions over frozen values and immutable
snapshots: the ztunnel decides connections with them today, an L7 waypoint
will reuse them. Nothing here opens a socket or holds state.
"""

from .authz import (
    Connection,
    PolicySet,
    Verdict,
    authorize,
    evaluate,
    plaintext_verdict,
    recheck,
)
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
    "PolicySet",
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
    "recheck",
    "string_matches",
]
