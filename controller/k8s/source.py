"""The Kubernetes registry source: watch caches in, RegistryState out.

One :class:`~controller.k8s.reflector.Reflector` per watched type keeps a cache
of API objects. Whenever any cache changes, the source waits a short debounce
(so a burst of pod events becomes one update), converts a snapshot of all
caches into a RegistryState (:func:`controller.k8s.convert.convert`) and
publishes it to the :class:`~controller.registry.RegistryHolder`, from where the
Discovery hub diffs it and streams only the changes to nodes, exactly as for
the YAML source.

Nothing is published until every *required* type (namespaces, pods and the
policies: :data:`~controller.k8s.kinds.REQUIRED_KINDS`) has completed its first
list: a node must never see a partial cluster (say, pods without their policies)
as the truth. The *optional* types (Services, EndpointSlices) are waited for
until they list or fail with a known cause (403, 404, repeated 5xx); a failed
one leaves service VIPs empty until it lists, and :meth:`KubernetesSource.health`
says so.
Policy verdicts go to the :class:`~controller.k8s.status.StatusWriter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.registry import RegistryError, RegistryHolder

from .client import KubeClient
from .convert import Conversion, ConversionCache, convert
from .kinds import (
    AUTHORIZATION_POLICIES,
    ENDPOINT_SLICES,
    NAMESPACES,
    PEER_AUTHENTICATIONS,
    PODS,
    REQUEST_AUTHENTICATIONS,
    REQUIRED_KINDS,
    SERVICES,
    WATCHED_KINDS,
    ResourceKind,
)
from .reflector import Reflector, WatchSettings
from .status import StatusWriter

__all__ = ["KindHealth", "KubernetesSource"]

log = logging.getLogger("veil.controller.k8s")

SOURCE_NAME = "kubernetes"


@dataclass(frozen=True, slots=True)
class KindHealth:
    """One watched kind on the health endpoint and in ``veil controller status``."""

    kind: str  # plural
    api_version: str  # as read (after discovery)
    required: bool
    state: str  # "synced", "pending" (first list not done) or "failed"
    cause: str = ""
    hint: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "synced"


class KubernetesSource:
    def __init__(
        self,
        client: KubeClient,
        holder: RegistryHolder,
        trust_domain: str,
        *,
        settings: WatchSettings | None = None,
        status: StatusWriter | None = None,
        debounce: float = 0.05,
    ) -> None:
        self._holder = holder
        self._trust_domain = trust_domain
        self._status = status
        self._debounce = debounce
        self._dirty = asyncio.Event()
        self.reflectors: dict[ResourceKind, Reflector] = {
            kind: Reflector(client, kind, self._dirty.set, settings=settings or WatchSettings())
            for kind in WATCHED_KINDS
        }
        self.synced = asyncio.Event()
        self.rebuilds = 0
        self.last_conversion: Conversion | None = None
        self._logged: set[tuple[str, ...]] = set()
        self._memo = ConversionCache()

    def set_status_writer(self, status: StatusWriter) -> None:
        self._status = status

    def lookup(self, kind: ResourceKind, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The cached object (the StatusWriter compares statuses against it)."""
        reflector = self.reflectors.get(kind)
        return None if reflector is None else reflector.cache.get((namespace, name))

    def _objects(self, kind: ResourceKind) -> list[Mapping[str, Any]]:
        return list(self.reflectors[kind].cache)

    def _convert(self, snapshot: Mapping[ResourceKind, list[Mapping[str, Any]]]) -> Conversion:
        return convert(
            self._trust_domain,
            namespaces=snapshot[NAMESPACES],
            pods=snapshot[PODS],
            services=snapshot[SERVICES],
            endpoint_slices=snapshot[ENDPOINT_SLICES],
            authorization_policies=snapshot[AUTHORIZATION_POLICIES],
            peer_authentications=snapshot[PEER_AUTHENTICATIONS],
            request_authentications=snapshot[REQUEST_AUTHENTICATIONS],
            cache=self._memo,
        )

    async def rebuild(self) -> bool:
        """Converts the caches and publishes; a failure keeps the previous state.

        The snapshot is taken on the event loop (cached objects are never
        mutated, so it is a list of references); the conversion, which grows with
        the cluster, runs on a worker thread so the gRPC listeners stay responsive.
        Publishing happens back on the loop, where the Discovery hub lives.
        """
        self.rebuilds += 1
        snapshot = {kind: list(r.cache) for kind, r in self.reflectors.items()}
        try:
            conversion = await asyncio.to_thread(self._convert, snapshot)
            self._holder.publish(conversion.state, source=SOURCE_NAME)
        except RegistryError as e:
            self._holder.report_error(e)
            return False
        self.last_conversion = conversion
        self._log_new(conversion)
        if self._status is not None:
            self._status.submit(conversion.verdicts)
        return True

    def _log_new(self, conversion: Conversion) -> None:
        """Logs each refusal and note once, not on every rebuild."""
        current: set[tuple[str, ...]] = set()
        for v in conversion.verdicts:
            if v.error is not None:
                verdict: tuple[str, ...] = (v.kind.kind, v.namespace, v.name, str(v.generation))
                current.add(verdict)
                if verdict not in self._logged:
                    log.warning(
                        "%s %s/%s not applied: %s", v.kind.kind, v.namespace, v.name, v.error
                    )
        for note in conversion.notes:
            current.add((note,))
            if (note,) not in self._logged:
                log.info("%s", note)
        self._logged = current

    async def wait_synced(self) -> None:
        await self.synced.wait()

    def health(self) -> list[KindHealth]:
        """Each watched kind: synced, still pending, or failed with its cause."""
        out: list[KindHealth] = []
        for kind, r in self.reflectors.items():
            required = kind in REQUIRED_KINDS
            if r.failure is not None:
                out.append(
                    KindHealth(
                        kind.plural,
                        r.kind.api_version,
                        required,
                        "failed",
                        r.failure.cause,
                        r.failure.hint,
                    )
                )
            else:
                state = "synced" if r.synced.is_set() else "pending"
                cause = ""
                if state == "pending" and r.last_error is not None:
                    cause = r.last_error.message
                out.append(KindHealth(kind.plural, r.kind.api_version, required, state, cause))
        return out

    async def _wait_initial(self) -> None:
        """Required kinds listed; optional ones listed or failed with a known cause."""
        for kind, r in self.reflectors.items():
            await (r.synced if kind in REQUIRED_KINDS else r.settled).wait()
        missing = [k.plural for k, r in self.reflectors.items() if not r.synced.is_set()]
        if missing:
            log.error(
                "serving degraded: %s not listed (service VIPs stay empty until they list); "
                "see `veil controller status`",
                ", ".join(missing),
            )

    async def run(self) -> None:
        """Runs the reflectors and publishes until cancelled."""
        tasks = [
            asyncio.create_task(r.run(), name=f"reflector-{k.plural}")
            for k, r in self.reflectors.items()
        ]
        try:
            await self._wait_initial()
            log.info("initial list of the required resource types complete")
            while True:
                self._dirty.clear()
                if await self.rebuild():
                    self.synced.set()
                await self._dirty.wait()
                await asyncio.sleep(self._debounce)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
