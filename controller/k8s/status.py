"""The ``Accepted`` status condition on Veil policy objects.

After each registry rebuild the source hands the verdicts (accepted, or refused
with a reason) to the :class:`StatusWriter`. It compares each verdict with the
status already on the object in the watch cache and patches only what differs,
so a status write (which itself comes back as a MODIFIED event) never causes
another. Only the leader writes; a controller that becomes leader reconciles
every object once.

:func:`status_patch` is the pure part: object + verdict + time -> JSON merge
patch for the ``status`` subresource, or None when nothing needs writing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from .backoff import Backoff
from .client import KubeClient
from .convert import PolicyVerdict
from .errors import KubernetesError
from .kinds import ResourceKind

__all__ = [
    "ACCEPTED",
    "REASON_ACCEPTED",
    "REASON_INVALID",
    "StatusWriter",
    "accepted_condition",
    "status_patch",
]

log = logging.getLogger("veil.controller.k8s")

ACCEPTED = "Accepted"
REASON_ACCEPTED = "Accepted"
REASON_INVALID = "Invalid"
_MAX_MESSAGE = 32768  # metav1.Condition's limit
_ACCEPTED_MESSAGE = "the policy is valid and is distributed to the nodes"

Json = Mapping[str, Any]
Lookup = Callable[[ResourceKind, str, str], Json | None]


def _rfc3339(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def accepted_condition(
    verdict: PolicyVerdict, previous: Json | None, now: datetime
) -> dict[str, Any]:
    """The Accepted condition for ``verdict``; keeps the transition time if the status holds."""
    status = "True" if verdict.accepted else "False"
    message = _ACCEPTED_MESSAGE if verdict.error is None else verdict.error
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    since = _rfc3339(now)
    if (
        previous is not None
        and previous.get("status") == status
        and previous.get("lastTransitionTime")
    ):
        since = str(previous["lastTransitionTime"])
    return {
        "type": ACCEPTED,
        "status": status,
        "reason": REASON_ACCEPTED if verdict.accepted else REASON_INVALID,
        "message": message,
        "observedGeneration": verdict.generation,
        "lastTransitionTime": since,
    }


def status_patch(obj: Json, verdict: PolicyVerdict, now: datetime) -> dict[str, Any] | None:
    """A merge patch setting the Accepted condition, or None if the object already has it.

    The patch carries the object's resourceVersion: if the object changed since
    the verdict was made, the API server answers 409 and the newer version gets
    its own verdict.
    """
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    if meta.get("generation", 0) != verdict.generation:
        return None  # the verdict is about an older spec; a rebuild is on its way
    status = obj.get("status")
    status = status if isinstance(status, Mapping) else {}
    raw_conditions = status.get("conditions")
    conditions = (
        [c for c in raw_conditions if isinstance(c, Mapping)]
        if isinstance(raw_conditions, list)
        else []
    )
    previous = next((c for c in conditions if c.get("type") == ACCEPTED), None)
    wanted = accepted_condition(verdict, previous, now)
    if (
        previous is not None
        and {k: previous.get(k) for k in wanted} == wanted
        and status.get("observedGeneration") == verdict.generation
    ):
        return None
    others = [dict(c) for c in conditions if c.get("type") != ACCEPTED]
    return {
        "metadata": {"resourceVersion": meta.get("resourceVersion")},
        # Merge patch replaces lists whole, so the other conditions are sent back.
        "status": {"observedGeneration": verdict.generation, "conditions": [*others, wanted]},
    }


class StatusWriter:
    """Keeps the Accepted condition of every policy object in line with its verdict."""

    def __init__(
        self,
        client: KubeClient,
        lookup: Lookup,
        is_leader: Callable[[], bool],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        backoff: Backoff | None = None,
    ) -> None:
        self._client = client
        self._lookup = lookup
        self._is_leader = is_leader
        self._clock = clock
        self._verdicts: dict[tuple[ResourceKind, str, str], PolicyVerdict] = {}
        self._wake = asyncio.Event()
        self._backoff = backoff or Backoff()
        self.writes = 0  # status patches sent (tests and logs)

    def submit(self, verdicts: Iterable[PolicyVerdict]) -> None:
        """The complete set of verdicts from the latest rebuild."""
        self._verdicts = {(v.kind, v.namespace, v.name): v for v in verdicts}
        self._wake.set()

    def poke(self) -> None:
        """Re-checks everything (called when this controller becomes leader)."""
        self._wake.set()

    async def _pass(self) -> bool:
        """One reconcile pass; False if a transient error means it must be retried."""
        ok = True
        for (kind, namespace, name), verdict in list(self._verdicts.items()):
            if not self._is_leader():
                return True
            obj = self._lookup(kind, namespace, name)
            if obj is None:
                continue
            patch = status_patch(obj, verdict, self._clock())
            if patch is None:
                continue
            try:
                await self._client.patch_status(kind, namespace, name, patch)
            except KubernetesError as e:
                if e.conflict or e.not_found:
                    continue  # a newer version (or its deletion) is on the watch already
                log.warning("status of %s %s/%s not written: %s", kind.kind, namespace, name, e)
                ok = False
                continue
            self.writes += 1
            if verdict.accepted:
                log.info("%s %s/%s accepted", kind.kind, namespace, name)
            else:
                log.warning("%s %s/%s refused: %s", kind.kind, namespace, name, verdict.error)
        return ok

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._is_leader():
                continue
            if await self._pass():
                self._backoff.reset()
            else:
                await asyncio.sleep(self._backoff.next_delay())
                self._wake.set()
