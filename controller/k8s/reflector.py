"""List-then-watch for one resource type, kept up to date forever.

A :class:`Reflector` lists, installs the list in its
:class:`~controller.k8s.watch.ObjectCache`, then watches from the list's
resourceVersion with bookmarks on. It reacts to the ways a watch ends:

* the server's ``timeoutSeconds`` elapses: watch again from the last version;
* the connection drops or an error event arrives: back off, then watch again from
  the last version (events replayed from there are idempotent in the cache);
* ``410 Gone``, as an HTTP status or an ERROR event: the version was compacted
  away, so list again and replace the cache whole; nothing is lost (the list is
  the truth) and nothing is duplicated (the cache is keyed by name);
* anything else (403, 500...): back off and list again.

``on_change`` is called (synchronously, from the loop) whenever the cache content
changed; the source debounces and rebuilds the registry from all caches.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from .backoff import Backoff
from .client import KubeClient
from .errors import KubernetesError
from .kinds import ResourceKind
from .watch import ApplyResult, EventType, ObjectCache, WatchProtocolError

__all__ = ["Reflector", "ReflectorStats", "WatchSettings"]

log = logging.getLogger("veil.controller.k8s")


@dataclass(frozen=True, slots=True)
class WatchSettings:
    # The server ends each watch after a random timeout in this range, spreading
    # re-watches of many controllers over time (client-go uses 5-10 minutes).
    min_timeout: int = 300
    max_timeout: int = 600
    backoff_initial: float = 0.8
    backoff_cap: float = 30.0


@dataclass(slots=True)
class ReflectorStats:
    """Counters for logs, ``veil controller`` status and tests."""

    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    gone: int = 0  # 410s that forced a relist
    errors: int = 0  # failed lists/watches (dropped connections included)


class Reflector:
    def __init__(
        self,
        client: KubeClient,
        kind: ResourceKind,
        on_change: Callable[[], None],
        *,
        settings: WatchSettings = WatchSettings(),
        namespace: str | None = None,
    ) -> None:
        self.client = client
        self.kind = kind
        self.cache = ObjectCache()
        self.stats = ReflectorStats()
        self.synced = asyncio.Event()
        self._on_change = on_change
        self._settings = settings
        self._namespace = namespace
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_cap)
        self.last_error: KubernetesError | None = None
        self._gone_streak = 0

    def _timeout(self) -> int:
        return random.randint(self._settings.min_timeout, self._settings.max_timeout)

    async def _list(self) -> None:
        self.stats.lists += 1
        items, rv = await self.client.list(self.kind, self._namespace)
        try:
            changed = self.cache.replace(items, rv)
        except WatchProtocolError as e:
            raise KubernetesError(f"list {self.kind.plural}: {e}") from None
        log.debug("listed %d %s at resourceVersion %s", len(items), self.kind.plural, rv)
        self.synced.set()
        if changed:
            self._on_change()

    async def _watch(self) -> bool:
        """One watch until it ends; True when the cache must be relisted."""
        self.stats.watches += 1
        async with self.client.watch(
            self.kind,
            self.cache.resource_version,
            timeout_seconds=self._timeout(),
            namespace=self._namespace,
        ) as events:
            async for event in events:
                result = self.cache.apply(event)
                self.stats.events += 1
                if result is ApplyResult.CHANGED:
                    self._on_change()
                elif result is ApplyResult.RELIST:
                    return True
                elif result is ApplyResult.RESTART:
                    status = event.object
                    raise KubernetesError(
                        f"watch {self.kind.plural}: error event {status.get('reason', '')}: "
                        f"{status.get('message', '')}",
                        status=event.status_code,
                        reason=str(status.get("reason") or ""),
                    )
                elif event.type is EventType.BOOKMARK:
                    self.stats.bookmarks += 1
                # Any good event proves the connection works.
                self._backoff.reset()
                self._gone_streak = 0
        return False

    async def _after_gone(self, detail: str) -> None:
        self.stats.gone += 1
        self._gone_streak += 1
        log.info("watch %s: %s (410 Gone), relisting", self.kind.plural, detail)
        # Two 410s without a good event between them: something keeps compacting
        # under us; do not hammer the API server with lists.
        if self._gone_streak > 1:
            await asyncio.sleep(self._backoff.next_delay())

    async def run(self) -> None:
        """Runs until cancelled; never raises for API trouble (it logs and retries)."""
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                loop = asyncio.get_running_loop()
                started, events_before = loop.time(), self.stats.events
                need_list = await self._watch()
                self.last_error = None
                quick = loop.time() - started < 1.0
                if not need_list and self.stats.events == events_before and quick:
                    # An empty watch that ended at once: the server is not honouring
                    # timeoutSeconds; do not spin.
                    await asyncio.sleep(self._backoff.next_delay())
                if need_list:
                    await self._after_gone(f"resourceVersion {self.cache.resource_version} expired")
            except KubernetesError as e:
                self.last_error = e
                if e.gone:
                    need_list = True
                    await self._after_gone(e.message)
                    continue
                self.stats.errors += 1
                if not self.cache.synced or (400 <= e.status < 500 and e.status != 429):
                    # Never listed, or a 403/404...: the watch cannot resume as it was.
                    need_list = True
                delay = self._backoff.next_delay()
                log.warning(
                    "%s %s: %s; retrying in %.1fs",
                    "list" if need_list else "watch",
                    self.kind.plural,
                    e,
                    delay,
                )
                await asyncio.sleep(delay)
            except Exception:
                # A bug must not silently freeze one type's cache forever: log it,
                # start over from a fresh list after a pause.
                log.exception("reflector for %s failed; relisting", self.kind.plural)
                self.stats.errors += 1
                need_list = True
                await asyncio.sleep(self._backoff.next_delay())
