"""What a registry reload changes, and whether the change is too drastic to apply at once.

The file watcher compares the state it is about to publish with the current one:
:func:`diff_states` lists what each kind gains and loses, :meth:`RegistryChange.summary`
is the one-line log of every applied reload, and :meth:`RegistryChange.drastic`
names the removals that a torn or truncated write typically causes (every
AuthorizationPolicy gone, every PeerAuthentication gone, more than half of the
workloads gone). The watcher holds such a reload back until the file has been
stable for several seconds; see docs/registry.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.api.model import RegistryState

__all__ = ["KindChange", "RegistryChange", "diff_states"]

_NAMES_SHOWN = 3


@dataclass(frozen=True, slots=True)
class KindChange:
    """Keys of one kind added to and removed from the registry, sorted."""

    kind: str  # plural, as in the document: "workloads"
    before: int
    added: tuple[str, ...]
    removed: tuple[str, ...]

    def describe(self) -> str:
        """``workloads +2 (shop/a, shop/b) -1 (shop/c)``, or "" when nothing changed."""
        parts = [self.kind]
        for sign, keys in (("+", self.added), ("-", self.removed)):
            if keys:
                shown = ", ".join(keys[:_NAMES_SHOWN])
                more = f", ... {len(keys) - _NAMES_SHOWN} more" if len(keys) > _NAMES_SHOWN else ""
                parts.append(f"{sign}{len(keys)} ({shown}{more})")
        return " ".join(parts) if len(parts) > 1 else ""


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """The differences between two registry states, kind by kind."""

    kinds: tuple[KindChange, ...]
    modified: int  # objects present in both states whose content changed

    def summary(self) -> str:
        """One line for the log: what each kind gains and loses, and how many changed."""
        parts = [d for d in (k.describe() for k in self.kinds) if d]
        if self.modified:
            parts.append(f"{self.modified} changed")
        return "; ".join(parts) if parts else "no object added or removed"

    def _kind(self, kind: str) -> KindChange:
        return next(k for k in self.kinds if k.kind == kind)

    def drastic(self) -> tuple[str, ...]:
        """Why this change looks like a torn write (empty when it does not)."""
        reasons: list[str] = []
        for kind in ("authorizationPolicies", "peerAuthentications"):
            k = self._kind(kind)
            if k.before and len(k.removed) == k.before:
                reasons.append(f"removes all {k.before} {kind}")
        w = self._kind("workloads")
        if w.before and len(w.removed) * 2 > w.before:
            reasons.append(f"removes {len(w.removed)} of {w.before} workloads")
        return tuple(reasons)


def _keys_diff(kind: str, old: Sequence[object], new: Sequence[object]) -> tuple[KindChange, int]:
    before = {getattr(o, "key"): o for o in old}  # noqa: B009 - every model type has .key
    after = {getattr(o, "key"): o for o in new}  # noqa: B009
    added = tuple(sorted(after.keys() - before.keys()))
    removed = tuple(sorted(before.keys() - after.keys()))
    modified = sum(
        1
        for k in before.keys() & after.keys()
        if before[k] is not after[k] and before[k] != after[k]
    )
    return KindChange(kind, len(before), added, removed), modified


def diff_states(old: RegistryState, new: RegistryState) -> RegistryChange:
    """What publishing ``new`` in place of ``old`` adds, removes and changes."""
    pairs: tuple[tuple[str, Sequence[object], Sequence[object]], ...] = (
        ("namespaces", old.namespaces, new.namespaces),
        ("workloads", old.workloads, new.workloads),
        ("services", old.services, new.services),
        ("authorizationPolicies", old.authorization_policies, new.authorization_policies),
        ("peerAuthentications", old.peer_authentications, new.peer_authentications),
        ("requestAuthentications", old.request_authentications, new.request_authentications),
    )
    kinds: list[KindChange] = []
    modified = 0
    for kind, before, after in pairs:
        change, changed = _keys_diff(kind, before, after)
        kinds.append(change)
        modified += changed
    return RegistryChange(tuple(kinds), modified)
