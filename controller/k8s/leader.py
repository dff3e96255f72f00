"""Leader election on a ``coordination.k8s.io/v1`` Lease.

Every controller replica serves nodes (Identity and Discovery read only the
watch caches and the shared CA). The leader alone does what must happen once:
writing policy status conditions, creating the CA Secret when it is absent, and
publishing the public trust bundle ConfigMap.

The algorithm is client-go's: the holder renews ``spec.renewTime`` every
``retry_period``; others take over once they have seen no change in the Lease
for ``lease_duration`` measured on *their own* monotonic clock (so clock skew
between nodes does not matter); every write is a PUT carrying the Lease's
resourceVersion, so of two replicas racing for an expired Lease exactly one
wins (the other gets 409). A leader that cannot renew within
``renew_deadline`` (< ``lease_duration``) steps down before anyone else may
take over. :func:`decide` is the pure part.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .client import KubeClient
from .errors import KubernetesError
from .kinds import LEASES

__all__ = ["LeaderElector", "LeaseAction", "LeaseRecord", "LeaseTiming", "decide"]

log = logging.getLogger("veil.controller.k8s")


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The fields of a Lease that election reads."""

    holder: str
    lease_duration: int
    renew_time: str
    transitions: int
    resource_version: str

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LeaseRecord:
        spec = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        duration = spec.get("leaseDurationSeconds")
        transitions = spec.get("leaseTransitions")
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            lease_duration=duration if isinstance(duration, int) and duration > 0 else 15,
            renew_time=str(spec.get("renewTime") or ""),
            transitions=transitions if isinstance(transitions, int) else 0,
            resource_version=str(meta.get("resourceVersion") or ""),
        )


class LeaseAction(enum.Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # we hold it
    ACQUIRE = "acquire"  # free or expired: take it over
    WAIT = "wait"  # someone else holds it


def decide(record: LeaseRecord | None, me: str, observed_age: float) -> LeaseAction:
    """What to do with the Lease.

    ``observed_age``: seconds, on our monotonic clock, since we last saw the
    record change (holder or renewTime). Remote timestamps are never compared
    with the local clock.
    """
    if record is None:
        return LeaseAction.CREATE
    if record.holder == me:
        return LeaseAction.RENEW
    if not record.holder or observed_age > record.lease_duration:
        return LeaseAction.ACQUIRE
    return LeaseAction.WAIT


def _micro_time(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Runs the election loop; ``is_leader`` is safe to read at any time."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        timing: LeaseTiming = LeaseTiming(),
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._timing = timing
        self._monotonic = monotonic
        self._leader = False
        self._listeners: list[Callable[[bool], None]] = []
        self._observed: tuple[str, str] | None = None  # (holder, renewTime)
        self._observed_at = 0.0
        self._last_renew = 0.0
        self.changed = asyncio.Event()  # set on every leadership change
        self.leader_identity = ""

    @property
    def is_leader(self) -> bool:
        return self._leader

    def add_listener(self, callback: Callable[[bool], None]) -> None:
        """``callback(is_leader)`` on every change, from the election loop."""
        self._listeners.append(callback)

    def _now(self) -> float:
        return self._monotonic() if self._monotonic else asyncio.get_running_loop().time()

    def _set_leader(self, value: bool) -> None:
        if value == self._leader:
            return
        self._leader = value
        log.info(
            "%s leadership of lease %s/%s",
            "acquired" if value else "lost",
            self.namespace,
            self.name,
        )
        self.changed.set()
        for cb in list(self._listeners):
            try:
                cb(value)
            except Exception:
                log.exception("leadership listener failed")

    def _body(self, record: LeaseRecord | None, now: datetime, acquire: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": round(self._timing.lease_duration),
            "renewTime": _micro_time(now),
            "leaseTransitions": (record.transitions if record else 0)
            + (1 if acquire and record else 0),
        }
        if acquire:
            spec["acquireTime"] = _micro_time(now)
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if record is not None:
            metadata["resourceVersion"] = record.resource_version
        return {
            "apiVersion": LEASES.api_version,
            "kind": LEASES.kind,
            "metadata": metadata,
            "spec": spec,
        }

    async def _read(self) -> LeaseRecord | None:
        obj = await self._client.get_optional(LEASES, self.namespace, self.name)
        if obj is None:
            return None
        record = LeaseRecord.from_json(obj)
        seen = (record.holder, record.renew_time)
        if seen != self._observed:
            self._observed = seen
            self._observed_at = self._now()
        self.leader_identity = record.holder
        return record

    async def try_acquire_or_renew(self) -> bool:
        """One election step; returns whether we hold the Lease afterwards."""
        record = await self._read()
        action = decide(record, self.identity, self._now() - self._observed_at)
        if action is LeaseAction.WAIT:
            return False
        now = datetime.now(UTC)
        body = self._body(record, now, acquire=action is not LeaseAction.RENEW)
        try:
            if action is LeaseAction.CREATE:
                await self._client.create(LEASES, self.namespace, body)
            else:
                await self._client.replace(LEASES, self.namespace, self.name, body)
        except KubernetesError as e:
            if e.conflict:
                return False  # another replica wrote first
            raise
        self._last_renew = self._now()
        self.leader_identity = self.identity
        return True

    async def run(self) -> None:
        """Elects and renews until cancelled; on cancel, releases the Lease if held."""
        try:
            while True:
                try:
                    held = await self.try_acquire_or_renew()
                except KubernetesError as e:
                    log.warning("lease %s/%s: %s", self.namespace, self.name, e)
                    held = False
                    if (
                        self._leader
                        and self._now() - self._last_renew < self._timing.renew_deadline
                    ):
                        held = True  # keep leading until the renew deadline passes
                self._set_leader(held)
                await asyncio.sleep(self._timing.retry_period)
        finally:
            if self._leader:
                self._set_leader(False)
                await asyncio.shield(self._release())

    async def _release(self) -> None:
        """Hands the Lease back so a standby takes over at once instead of after expiry."""
        try:
            record = await self._read()
            if record is None or record.holder != self.identity:
                return
            body = self._body(record, datetime.now(UTC), acquire=False)
            body["spec"]["holderIdentity"] = ""
            body["spec"]["leaseDurationSeconds"] = 1
            await self._client.replace(LEASES, self.namespace, self.name, body)
        except KubernetesError as e:
            log.info("lease %s/%s not released: %s", self.namespace, self.name, e)
