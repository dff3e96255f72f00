"""The pure policy model every node process shares.

AuthorizationPolicy compilation and matching (:mod:`.match`), evaluation in
Istio's order (:mod:`.authz`), the effective PeerAuthentication mode
(:mod:`.peer_auth`) and, for the waypoint, request-path normalisation
(:mod:`.path`) and L7 request authorization (:mod:`.l7`). Pure functions over
frozen values and immutable snapshots: the ztunnel decides connections with
them, the waypoint requests. Nothing here opens a socket or holds state.
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
from .l7 import (
    L7Policy,
    L7PolicySet,
    RequestFacts,
    attached_to,
    compile_l7_policy,
    evaluate_request,
)
from .match import (
    L4_CONDITION_KEYS,
    CompiledPolicy,
    ConnectionFacts,
    compile_policy,
    l7_terms,
    parse_ip_block,
    policy_matches,
    principal_text,
    string_matches,
)
from .path import BadPath, NormalizedTarget, normalize_path, normalize_target
from .peer_auth import DEFAULT_MODE, effective_mode, mode_source

__all__ = [
    "DEFAULT_MODE",
    "L4_CONDITION_KEYS",
    "BadPath",
    "CompiledPolicy",
    "Connection",
    "ConnectionFacts",
    "L7Policy",
    "L7PolicySet",
    "NormalizedTarget",
    "PolicySet",
    "RequestFacts",
    "Verdict",
    "attached_to",
    "authorize",
    "compile_l7_policy",
    "compile_policy",
    "effective_mode",
    "evaluate",
    "evaluate_request",
    "l7_terms",
    "mode_source",
    "normalize_path",
    "normalize_target",
    "parse_ip_block",
    "plaintext_verdict",
    "policy_matches",
    "principal_text",
    "recheck",
    "string_matches",
]
