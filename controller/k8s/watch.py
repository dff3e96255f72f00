"""The list/watch protocol without IO: watch-event parsing and the object cache.

A Kubernetes watch is a stream of JSON lines, one event each::

    {"type": "ADDED", "object": {...}}
    {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "812"}}}
    {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}

:func:`parse_watch_line` turns one line into a frozen :class:`WatchEvent` (or
raises :class:`WatchProtocolError`); :class:`ObjectCache` holds the current
objects of one resource type and applies events or a whole relist to them,
saying what the reflector must do next. The IO (HTTP, reconnects, backoff) lives
in :mod:`controller.k8s.reflector`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ApplyResult",
    "EventType",
    "ObjectCache",
    "ObjectKey",
    "WatchEvent",
    "WatchProtocolError",
    "object_key",
    "parse_watch_line",
    "resource_version_of",
]

# (namespace, name); namespace is "" for cluster-scoped objects.
ObjectKey = tuple[str, str]

# A watch line is one object; the API server caps objects at about 1.5 MiB (etcd's
# request limit). Anything far larger is not a Kubernetes object.
MAX_LINE_BYTES = 8 * 1024 * 1024


class WatchProtocolError(ValueError):
    """A watch line is not a well-formed event; the reflector restarts the watch."""


class EventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    object: Mapping[str, Any]

    @property
    def resource_version(self) -> str:
        return resource_version_of(self.object)

    @property
    def status_code(self) -> int:
        """For ERROR events: the ``Status.code`` (410 means relist), else 0."""
        code = self.object.get("code", 0)
        return code if isinstance(code, int) and not isinstance(code, bool) else 0


def resource_version_of(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    if isinstance(meta, Mapping):
        rv = meta.get("resourceVersion")
        if isinstance(rv, str):
            return rv
    return ""


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    """``(namespace, name)`` of an API object; raises WatchProtocolError without a name."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise WatchProtocolError("object has no metadata")
    name = meta.get("name")
    namespace = meta.get("namespace", "")
    if not isinstance(name, str) or not name:
        raise WatchProtocolError("object has no metadata.name")
    if not isinstance(namespace, str):
        raise WatchProtocolError("object metadata.namespace is not a string")
    return namespace, name


def parse_watch_line(line: bytes) -> WatchEvent:
    """One line of a watch stream as an event.

    Object events must carry ``metadata.name`` (the cache key); bookmarks must
    carry ``metadata.resourceVersion``; errors carry a ``Status``.
    """
    if len(line) > MAX_LINE_BYTES:
        raise WatchProtocolError(f"watch event of {len(line)} bytes exceeds {MAX_LINE_BYTES}")
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise WatchProtocolError(f"watch event is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise WatchProtocolError("watch event is not a JSON object")
    raw_type = doc.get("type")
    obj = doc.get("object")
    if not isinstance(raw_type, str) or not isinstance(obj, dict):
        raise WatchProtocolError("watch event lacks 'type' or 'object'")
    try:
        etype = EventType(raw_type)
    except ValueError:
        raise WatchProtocolError(f"unknown watch event type {raw_type!r}") from None
    event = WatchEvent(etype, obj)
    if etype is EventType.BOOKMARK:
        if not event.resource_version:
            raise WatchProtocolError("BOOKMARK event without metadata.resourceVersion")
    elif etype is not EventType.ERROR:
        object_key(obj)
    return event


class ApplyResult(enum.Enum):
    CHANGED = "changed"  # the cache content changed: rebuild the registry
    UNCHANGED = "unchanged"  # bookmark or duplicate: only the resourceVersion moved
    RELIST = "relist"  # 410 Gone: the resourceVersion is too old, list again
    RESTART = "restart"  # another error event: watch again from the last version


def _trim(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drops ``metadata.managedFields``: often the largest part of an object, never read."""
    meta = obj.get("metadata")
    if isinstance(meta, Mapping) and "managedFields" in meta:
        return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return obj


class ObjectCache:
    """The current objects of one resource type, keyed by (namespace, name).

    ``resource_version`` is where the next watch resumes. Objects are kept as the
    API's JSON (with managedFields dropped) and are never mutated after insertion.
    """

    def __init__(self) -> None:
        self._objects: dict[ObjectKey, Mapping[str, Any]] = {}
        self.resource_version = ""
        self.synced = False  # True once a list has completed

    def __len__(self) -> int:
        return len(self._objects)

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self._objects.values())

    def get(self, key: ObjectKey) -> Mapping[str, Any] | None:
        return self._objects.get(key)

    def object_keys(self) -> frozenset[ObjectKey]:
        return frozenset(self._objects)

    def replace(self, items: Iterable[Mapping[str, Any]], resource_version: str) -> bool:
        """Installs a complete list (initial sync or relist); True if anything changed.

        A relist after ``410 Gone`` goes through here: objects deleted while the
        watch was away disappear, new ones appear, and keys make duplicates
        impossible.
        """
        fresh: dict[ObjectKey, Mapping[str, Any]] = {}
        for item in items:
            fresh[object_key(item)] = _trim(item)
        old = {k: resource_version_of(v) for k, v in self._objects.items()}
        new = {k: resource_version_of(v) for k, v in fresh.items()}
        changed = old != new or not self.synced
        self._objects = fresh
        self.resource_version = resource_version
        self.synced = True
        return changed

    def apply(self, event: WatchEvent) -> ApplyResult:
        if event.type is EventType.ERROR:
            return ApplyResult.RELIST if event.status_code == 410 else ApplyResult.RESTART
        rv = event.resource_version
        if event.type is EventType.BOOKMARK:
            self.resource_version = rv
            return ApplyResult.UNCHANGED
        key = object_key(event.object)
        if rv:
            self.resource_version = rv
        current = self._objects.get(key)
        if event.type is EventType.DELETED:
            if current is None:
                return ApplyResult.UNCHANGED
            del self._objects[key]
            return ApplyResult.CHANGED
        # ADDED or MODIFIED: the same resourceVersion again is a replayed event.
        if current is not None and rv and resource_version_of(current) == rv:
            return ApplyResult.UNCHANGED
        self._objects[key] = _trim(event.object)
        return ApplyResult.CHANGED
