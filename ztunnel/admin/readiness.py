"""Readiness of the ztunnel, as the kubelet's probe on :15021 sees it.

Ready means the node can carry its workloads' traffic: the first snapshot
from the controller has arrived, and every enrolled workload of this node has
a valid certificate (trivially true with no local workloads). Other components
add their own checks (the proxy: "listeners bound"). The answer is computed on
every probe, so a ztunnel whose certificates expired during a long controller
outage reports it instead of hiding it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from node.state.store import StateStore

from ..identity.manager import CertManager

__all__ = ["Readiness", "ReadinessCheck", "ReadinessResult"]

# A check returns None when fine, else a sentence saying what is missing.
ReadinessCheck = Callable[[], str | None]


@dataclass(frozen=True, slots=True)
class ReadinessResult:
    ready: bool
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"ready": self.ready, "reasons": list(self.reasons)}


class Readiness:
    def __init__(self, store: StateStore, certs: CertManager | None) -> None:
        self._store = store
        self._certs = certs
        self._checks: list[tuple[str, ReadinessCheck]] = []

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks.append((name, check))

    def check(self) -> ReadinessResult:
        reasons: list[str] = []
        snap = self._store.current
        if not snap.synced:
            reasons.append("waiting for the first snapshot from the controller")
        else:
            missing = sorted(
                str(i)
                for i in snap.local_identities()
                if self._certs is None or self._certs.get(i) is None
            )
            if missing:
                reasons.append("no valid certificate yet for " + ", ".join(missing))
        for name, chk in self._checks:
            try:
                why = chk()
            except Exception as e:
                why = f"check failed: {type(e).__name__}: {e}"
            if why:
                reasons.append(f"{name}: {why}")
        return ReadinessResult(ready=not reasons, reasons=tuple(reasons))
