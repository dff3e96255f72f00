"""Effective PeerAuthentication mode of a workload.

Precedence, as in Istio: a workload-selector policy in the workload's
namespace beats a namespace-wide policy (no selector), which beats the
mesh-wide policy (no selector, in the root namespace). ``UNSET`` at one level
inherits from the next; with nothing set the mode is PERMISSIVE. When several
policies tie at one level the one with the smallest name wins, so the answer
does not depend on arrival order (Istio picks the oldest, which a node cannot
know).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.api.model import ROOT_NAMESPACE, PeerAuthentication, PeerAuthMode, Workload

if TYPE_CHECKING:
    # Only the type: the snapshot builds policy sets from this package.
    from node.state.snapshot import Snapshot

__all__ = ["DEFAULT_MODE", "effective_mode", "mode_source"]

DEFAULT_MODE = PeerAuthMode.PERMISSIVE


def _levels(snapshot: Snapshot, workload: Workload) -> list[PeerAuthentication | None]:
    in_ns = snapshot.peer_authentications_in(workload.namespace)
    selected = [a for a in in_ns if a.selector is not None and a.selector.matches(workload.labels)]
    namespace_wide = [a for a in in_ns if a.selector is None]
    mesh_wide = [a for a in snapshot.peer_authentications_in(ROOT_NAMESPACE) if a.selector is None]
    # Lists arrive sorted by key from the snapshot.
    return [
        selected[0] if selected else None,
        namespace_wide[0] if namespace_wide else None,
        mesh_wide[0] if mesh_wide else None,
    ]


def mode_source(snapshot: Snapshot, workload: Workload) -> PeerAuthentication | None:
    """The policy that decides the workload's mode, or None for the default."""
    for level in _levels(snapshot, workload):
        if level is not None and level.mode is not PeerAuthMode.UNSET:
            return level
    return None


def effective_mode(snapshot: Snapshot, workload: Workload) -> PeerAuthMode:
    """STRICT or PERMISSIVE (never UNSET) for ``workload``."""
    src = mode_source(snapshot, workload)
    return src.mode if src is not None else DEFAULT_MODE
