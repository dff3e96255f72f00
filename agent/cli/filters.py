"""``-n/--namespace`` and ``--workload``: the filters every veilctl list takes.

A workload is written ``NAME`` or ``NAMESPACE/NAME``; with ``-n`` a bare name
is looked up in that namespace. Each list knows which workload keys a row
belongs to (a connection has two, a certificate the workloads of its identity,
a policy the workloads it applies to); a row is kept when one of them matches.
Pure functions over the documents the components serve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RowFilter", "identity_namespace"]


def identity_namespace(identity: str | None) -> str | None:
    """``spiffe://td/ns/NS/sa/SA`` -> ``NS`` (None for anything else)."""
    parts = (identity or "").split("/")
    try:
        return parts[parts.index("ns") + 1]
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class RowFilter:
    namespace: str | None = None
    workload: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.namespace or self.workload)

    def _workload_matches(self, key: str) -> bool:
        if self.workload is None:
            return True
        ns, _, name = key.partition("/")
        if "/" in self.workload:
            return key == self.workload
        return name == self.workload and (self.namespace is None or ns == self.namespace)

    def key_matches(self, key: str | None) -> bool:
        """One workload key ``ns/name`` against both filters."""
        if not key:
            return not self.active
        # A qualified --workload ns/name names its namespace itself.
        qualified = self.workload is not None and "/" in self.workload
        in_ns = self.namespace is None or key.startswith(self.namespace + "/") or qualified
        return in_ns and self._workload_matches(key)

    def any_key(self, keys: Iterable[str | None]) -> bool:
        return not self.active or any(self.key_matches(k) for k in keys)

    # -- one method per list ------------------------------------------------------

    def pods(self, pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [p for p in pods if self.any_key([p.get("workload")])]

    def workloads(self, workloads: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [w for w in workloads if self.any_key([w.get("key")])]

    def services(self, services: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """A service is kept for its namespace, or for a matching endpoint."""
        out = []
        for s in services:
            in_ns = self.namespace is None or s.get("namespace") == self.namespace
            if self.workload is None:
                if in_ns:
                    out.append(s)
            elif self.any_key(s.get("endpoints") or []):
                out.append(s)
        return out

    def policies(
        self, policies: Sequence[Mapping[str, Any]], workloads: Sequence[Mapping[str, Any]]
    ) -> list[Mapping[str, Any]]:
        """By namespace of the policy; with --workload, those applying to it
        (as the ztunnel computed them: ``workloads[].policies``)."""
        if self.workload is not None:
            keys = {
                k
                for w in workloads
                if self.key_matches(w.get("key"))
                for k in w.get("policies") or []
            }
            return [p for p in policies if p.get("key") in keys]
        return [
            p for p in policies if self.namespace is None or p.get("namespace") == self.namespace
        ]

    def certificates(
        self, certs: Sequence[Mapping[str, Any]], workloads: Sequence[Mapping[str, Any]]
    ) -> list[Mapping[str, Any]]:
        """By the namespace in the identity; with --workload, that workload's identity."""
        if self.workload is not None:
            ids = {w.get("identity") for w in workloads if self.key_matches(w.get("key"))}
            return [c for c in certs if c.get("identity") in ids]
        return [
            c
            for c in certs
            if self.namespace is None or identity_namespace(c.get("identity")) == self.namespace
        ]

    def connections(self, conns: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [c for c in conns if self.any_key([c.get("src_workload"), c.get("dst_workload")])]

    def events(self, events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Monitor events: a deny names two workloads, a drop its pod."""
        return [e for e in events if self.event(e)]

    def event(self, e: Mapping[str, Any]) -> bool:
        return self.any_key([e.get("pod"), e.get("src_workload"), e.get("dst_workload")])
