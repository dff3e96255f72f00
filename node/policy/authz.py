"""L4 authorization: is this connection to this workload allowed?

Every function here is pure. The order is Istio's:

1. any matching DENY policy denies;
2. if no ALLOW policy applies to the destination workload, allow;
3. any matching ALLOW policy allows;
4. otherwise deny.

A policy that could not be compiled (for example a malformed ``ipBlocks``
entry that slipped past the controller) fails closed: an invalid DENY policy
counts as matching, an invalid ALLOW policy matches nothing. A policy we
cannot understand therefore never widens access.

The policies that apply to a workload arrive as a :class:`PolicySet`: compiled
and split into DENY and ALLOW lists, each in key order. The snapshot builds one
per local workload when it is built (:meth:`node.state.Snapshot.policy_set_for`),
so the data path neither compiles nor sorts anything.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from controller.api.model import AuthorizationPolicy, PeerAuthMode, PolicyAction, Workload
from controller.api.spiffe import SpiffeId

from .match import CompiledPolicy, ConnectionFacts, compile_policy
from .peer_auth import effective_mode

if TYPE_CHECKING:
    from node.state.snapshot import Snapshot

__all__ = [
    "Connection",
    "PolicySet",
    "Verdict",
    "authorize",
    "evaluate",
    "plaintext_verdict",
    "recheck",
]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Connection:
    """What authorization knows about a connection to an enrolled workload.

    ``src_identity`` is the verified peer SPIFFE ID (HBONE, or the local
    source workload on the same node), or None for plaintext.
    """

    src_ip: str
    dst_ip: str
    dst_port: int
    src_identity: SpiffeId | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str
    policy: str | None = None  # "<namespace>/<name>" of the deciding policy

    def to_json(self) -> dict[str, object]:
        return {"allowed": self.allowed, "reason": self.reason, "policy": self.policy}


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The compiled policies that apply to one workload, in evaluation order."""

    deny: tuple[CompiledPolicy, ...] = ()
    allow: tuple[CompiledPolicy, ...] = ()

    @classmethod
    def of(cls, policies: Iterable[CompiledPolicy]) -> PolicySet:
        # A policy attached by targetRefs is the waypoint's to enforce, not ours.
        ordered = sorted((p for p in policies if not p.attached), key=lambda p: p.key)
        return cls(
            deny=tuple(p for p in ordered if p.action is PolicyAction.DENY),
            allow=tuple(p for p in ordered if p.action is PolicyAction.ALLOW),
        )

    @classmethod
    def compile(cls, policies: Iterable[AuthorizationPolicy]) -> PolicySet:
        """Compiles ``policies`` (for callers holding plain policies, such as tests)."""
        return cls.of(compile_policy(p) for p in policies)


def evaluate(conn: Connection, policies: PolicySet | Iterable[AuthorizationPolicy]) -> Verdict:
    """Evaluates ``conn`` against the policies that apply to its destination."""
    pset = policies if isinstance(policies, PolicySet) else PolicySet.compile(policies)
    facts = ConnectionFacts.of(conn.src_ip, conn.dst_port, conn.src_identity)
    for p in pset.deny:
        if p.invalid is not None:
            return Verdict(False, f"DENY policy {p.key} is invalid ({p.invalid})", p.key)
        if p.matches(facts):
            return Verdict(False, f"denied by DENY policy {p.key}", p.key)
    if not pset.allow:
        return Verdict(True, "no ALLOW policy applies")
    for p in pset.allow:
        if p.invalid is None and p.matches(facts):
            return Verdict(True, f"allowed by ALLOW policy {p.key}", p.key)
    return Verdict(False, "no ALLOW policy matched")


def authorize(conn: Connection, snapshot: Snapshot, destination: Workload | None = None) -> Verdict:
    """Authorizes ``conn`` against the policies of its destination workload.

    ``destination`` defaults to the workload owning ``conn.dst_ip``; a
    destination the snapshot does not know is denied (fail closed).
    """
    dest = destination if destination is not None else snapshot.workload_by_ip(conn.dst_ip)
    if dest is None:
        return Verdict(False, f"destination {conn.dst_ip} is not a known workload")
    return evaluate(conn, snapshot.policy_set_for(dest))


def plaintext_verdict(snapshot: Snapshot, workload: Workload) -> Verdict:
    """Peer authentication for plaintext: STRICT refuses, PERMISSIVE accepts."""
    mode = effective_mode(snapshot, workload)
    if mode is PeerAuthMode.STRICT:
        return Verdict(False, f"peer authentication for {workload.key} is STRICT (mTLS required)")
    return Verdict(True, f"peer authentication for {workload.key} is {mode.value}")


def recheck(
    snapshot: Snapshot, connections: Iterable[tuple[K, Connection]]
) -> Sequence[tuple[K, Verdict]]:
    """The live connections ``snapshot`` no longer allows, with the reason.

    The caller (the proxy, which owns the sockets) closes them. Plaintext
    connections are re-checked against peer authentication too.
    """
    out: list[tuple[K, Verdict]] = []
    for handle, conn in connections:
        dest = snapshot.workload_by_ip(conn.dst_ip)
        if dest is None:
            out.append((handle, Verdict(False, f"destination {conn.dst_ip} left the mesh")))
            continue
        if conn.src_identity is None:
            pv = plaintext_verdict(snapshot, dest)
            if not pv.allowed:
                out.append((handle, pv))
                continue
        v = evaluate(conn, snapshot.policy_set_for(dest))
        if not v.allowed:
            out.append((handle, v))
    return out
