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

Before its first list (and after a 404) the reflector resolves the kind's
version through API discovery (:mod:`controller.k8s.availability`). A failure
with a known cause (403, 404, repeated 5xx) is recorded as ``failure``, logged
once at ERROR, and sets ``settled``, so the source can decide whether to serve
without this kind; the reflector keeps retrying with backoff, so granting the
missing RBAC verb or installing the CRD fixes it without a restart.

``on_change`` is called (synchronously, from the loop) whenever the cache content
changed; the source debounces and rebuilds the registry from all caches.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from .availability import KindFailure, classify_failure, resolve_version
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
        # Synced, or failed with a known cause: the source stops waiting for it.
        self.settled = asyncio.Event()
        self.failure: KindFailure | None = None
        self._streaks = {"list": 0, "watch": 0}  # failures in a row, per verb
        self._resolved = False
        self._on_change = on_change
        self._settings = settings
        self._namespace = namespace
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_cap)
        self.last_error: KubernetesError | None = None
        self._gone_streak = 0

    def _timeout(self) -> int:
        return random.randint(self._settings.min_timeout, self._settings.max_timeout)

    def _record_failure(self, verb: str, err: KubernetesError) -> bool:
        """Records a failure's cause; True when it is (now) a known, logged failure."""
        self._streaks[verb] += 1
        failure = classify_failure(self.kind, verb, err, self._streaks[verb])
        if failure is None:
            return False
        if failure != self.failure:
            log.error(
                "cannot %s %s (%s): %s; %s; retrying with backoff",
                verb,
                self.kind.plural,
                self.kind.api_version,
                failure.cause,
                failure.hint,
            )
        self.failure = failure
        self.settled.set()
        return True

    def _clear_failure(self, verb: str) -> None:
        self._streaks[verb] = 0
        if self.failure is not None and (verb == "watch" or self.failure.verb != "watch"):
            log.info("%s %s works again", verb, self.kind.plural)
            self.failure = None

    async def _resolve(self) -> None:
        if not self._resolved:
            resolved = await resolve_version(self.client, self.kind)
            if resolved != self.kind:
                log.info(
                    "reading %s as %s (the newest version the API server serves)",
                    self.kind.plural,
                    resolved.api_version,
                )
            self.kind = resolved
            self._resolved = True

    async def _list(self) -> None:
        self.stats.lists += 1
        await self._resolve()
        items, rv = await self.client.list(self.kind, self._namespace)
        try:
            changed = self.cache.replace(items, rv)
        except WatchProtocolError as e:
            raise KubernetesError(f"list {self.kind.plural}: {e}") from None
        log.debug("listed %d %s at resourceVersion %s", len(items), self.kind.plural, rv)
        self._clear_failure("list")
        self.synced.set()
        self.settled.set()
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
            # The server accepted the watch (RBAC allows it, the version exists).
            self._clear_failure("watch")
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
                verb = "list" if need_list else "watch"
                if not self.cache.synced or (400 <= e.status < 500 and e.status != 429):
                    # Never listed, or a 403/404...: the watch cannot resume as it was.
                    need_list = True
                if e.not_found:
                    self._resolved = False  # the server may serve another version now
                known = self._record_failure(verb, e)
                delay = self._backoff.next_delay()
                # A known failure was logged at ERROR once; its retries are noise.
                log.log(
                    logging.DEBUG if known else logging.WARNING,
                    "%s %s: %s; retrying in %.1fs",
                    verb,
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
