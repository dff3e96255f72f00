"""Watches the registry (one YAML file, or a directory of them) and publishes each valid version.

Polling, woken early by inotify: a stat every ``interval`` seconds is cheap,
works on every filesystem (including ConfigMap volumes, which swap a symlink),
and follows editors that save by writing a new file and renaming it over the old
one (the inode changes, so the stamp changes); an inotify event for a completed
write (close after writing, rename in) only makes the next check happen now
instead of at the next tick. A file whose stamp changed is read and hashed; it
is parsed only when its content differs from the version cached for it, so an
unchanged broken file is reported once, and in a directory only the edited file
is parsed again. Reading, parsing and assembling run in a worker thread so a
large registry never stalls gRPC serving.

A torn or partial write is never applied (issue 9, docs/registry.md "Reloads"):

* content is parsed only after it has stayed unchanged for ``settle`` seconds
  (same stamps and same bytes before and after the window; a file replaced by
  rename, complete by construction, waits only RENAMED_SETTLE_SECONDS), and
  not while inotify reports the file modified and not yet closed;
* an empty or comment-only document is an error (:mod:`.document`);
* a reload that removes every AuthorizationPolicy, every PeerAuthentication or
  more than half of the workloads (what a file cut short looks like) is logged
  at WARNING and applied only once the files have stayed unchanged for
  ``hold`` seconds; a completed write replaces it before that.

Every applied reload logs one line of what it adds and removes.

A file that disappears is not acted on at once: editors that save by renaming
the old file away leave a moment with no file, and publishing that moment would
make every node drop the objects in it. Only a file missing on two polls in a
row counts (as an error for the registry file, as a removal in a directory).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from controller.api.model import RegistryState

from .changes import RegistryChange, diff_states
from .document import decode_document, parse_fragment, read_registry_bytes
from .errors import RegistryError
from .fragments import RegistryFragment, assemble, rebase
from .holder import RegistryHolder, describe_state
from .inotify import DirectoryEvents
from .lint import registry_warnings

__all__ = [
    "DEFAULT_HOLD_SECONDS",
    "DEFAULT_SETTLE_SECONDS",
    "REGISTRY_SUFFIXES",
    "RegistryFileWatcher",
    "list_registry_files",
]

log = logging.getLogger("veil.controller.registry")

REGISTRY_SUFFIXES = (".yaml", ".yml", ".json")
_MISSING_POLLS_BEFORE_ACTING = 2
# The settle window is added to every in-place reload, so to the registry
# write -> redirection latency (target p99 < 200 ms, met by rename-based
# writers, which wait only RENAMED_SETTLE_SECONDS).
DEFAULT_SETTLE_SECONDS = 0.2
DEFAULT_HOLD_SECONDS = 5.0
# A file replaced by rename (a new inode where the old file was: how editors,
# GitOps tools and ConfigMap volumes save) was written completely before it
# appeared, so it only waits this long; in-place writes wait ``settle``.
RENAMED_SETTLE_SECONDS = 0.02
_Read = bytes | RegistryError


@dataclass(frozen=True, slots=True)
class _Stamp:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class _Held:
    """A valid but drastic version waiting for its files to stay unchanged."""

    contents: tuple[tuple[Path, str], ...]
    since: float  # monotonic time it was first seen
    state: RegistryState
    change: RegistryChange
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Cached:
    digest: str
    fragment: RegistryFragment | None
    error: RegistryError | None


def list_registry_files(path: Path) -> dict[Path, _Stamp] | None:
    """The registry documents at ``path`` with their stamps; None when ``path`` is missing.

    A directory contributes its ``*.yaml``, ``*.yml`` and ``*.json`` files, not
    hidden ones (editor swap files, a ConfigMap's ``..data``), in name order.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not path.is_dir():
        return {path: _Stamp.of(st)}
    files: dict[Path, _Stamp] = {}
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return None
    for name in names:
        if name.startswith(".") or not name.endswith(REGISTRY_SUFFIXES):
            continue
        child = path / name
        try:
            cst = os.stat(child)
        except OSError:
            continue  # vanished between listdir and stat: the next poll sees it
        if not os.path.isdir(child):
            files[child] = _Stamp.of(cst)
    return files


class RegistryFileWatcher:
    """Keeps ``holder`` in step with the registry file or directory at ``path``.

    ``settle``: seconds new content must stay unchanged before it is parsed.
    ``hold``: seconds the files must stay unchanged before a drastic reload
    (see :meth:`~controller.registry.changes.RegistryChange.drastic`) is applied.
    """

    def __init__(
        self,
        path: Path,
        holder: RegistryHolder,
        *,
        interval: float = 0.5,
        settle: float = DEFAULT_SETTLE_SECONDS,
        hold: float = DEFAULT_HOLD_SECONDS,
    ) -> None:
        self.path = path
        self.interval = interval
        self.settle = settle
        self.hold = hold
        self._holder = holder
        self._stamps: dict[Path, _Stamp] = {}
        self._cache: dict[Path, _Cached] = {}
        self._tried: tuple[tuple[Path, str], ...] | None = None  # contents last assembled
        self._tried_ok = False  # ... and whether they became the current state
        self._missing_polls = 0
        self._events: DirectoryEvents | None = None
        self._unsettled = False  # a change was seen but not yet stable: look again soon
        self._held: _Held | None = None
        self._warnings: tuple[str, ...] = ()

    # -- one pass over the files (runs in a worker thread) -----------------

    def _read_changed(self, listing: dict[Path, _Stamp]) -> dict[Path, _Read]:
        """The bytes (or the read error) of every file whose stamp is new."""
        reads: dict[Path, _Read] = {}
        for file, stamp in listing.items():
            if file in self._cache and self._stamps.get(file) == stamp:
                continue
            try:
                reads[file] = read_registry_bytes(file)
            except RegistryError as e:
                reads[file] = e
        return reads

    def _refresh(
        self, listing: dict[Path, _Stamp], reads: dict[Path, _Read]
    ) -> tuple[
        dict[Path, _Cached], tuple[tuple[Path, str], ...], RegistryState | RegistryError | None
    ]:
        cache: dict[Path, _Cached] = {}
        for file in listing:
            old = self._cache.get(file)
            data = reads.get(file)
            if data is None and old is not None:
                cache[file] = old
                continue
            if data is None:
                data = RegistryError(f"registry file {file} was not read")
            if isinstance(data, RegistryError):
                cache[file] = _Cached("", None, data)
                continue
            digest = hashlib.sha256(data).hexdigest()
            if old is not None and old.digest == digest:
                cache[file] = old
                continue
            try:
                fragment = parse_fragment(decode_document(data, str(file)), str(file))
            except RegistryError as e:
                cache[file] = _Cached(digest, None, e)
            else:
                cache[file] = _Cached(digest, fragment, None)
        contents = tuple((f, c.digest) for f, c in cache.items())
        if contents == self._tried:
            return cache, contents, None
        for cached in cache.values():
            if cached.error is not None:
                return cache, contents, cached.error
        fragments = [c.fragment for c in cache.values() if c.fragment is not None]
        try:
            state = assemble(fragments)
        except RegistryError as e:
            return cache, contents, e
        if len(fragments) > 1:
            # Keep the built objects, so the next edit rebuilds only its own file.
            state_map = {f.source: f for f in rebase(fragments, state)}
            cache = {
                path: _Cached(c.digest, state_map[str(path)], None) if c.fragment else c
                for path, c in cache.items()
            }
        return cache, contents, state

    # -- the public surface ----------------------------------------------

    def load_initial(self) -> RegistryState:
        """Reads, validates and publishes the registry once; raises RegistryError if invalid.

        At startup there is no previous state to fall back on, so an invalid
        registry stops the controller with the error instead of serving nothing.
        """
        listing = list_registry_files(self.path)
        if listing is None:
            raise RegistryError(
                f"registry {self.path} does not exist",
                hint="create it (see examples/registry.yaml) or pass --registry with the right path",
            )
        cache, contents, result = self._refresh(listing, self._read_changed(listing))
        if isinstance(result, RegistryError):
            raise result
        assert result is not None
        self._holder.publish(result, source=str(self.path))
        self._stamps, self._cache, self._tried = listing, cache, contents
        self._tried_ok = True
        self._note_warnings(result)
        return result

    def _digests(self, reads: dict[Path, _Read]) -> dict[Path, str]:
        return {
            f: (hashlib.sha256(d).hexdigest() if isinstance(d, bytes) else "")
            for f, d in reads.items()
        }

    def _open_for_writing(self, listing: dict[Path, _Stamp]) -> bool:
        """True while inotify says a file is half-written (modified, not yet closed).

        A writer that keeps the file open but has not written for ``hold``
        seconds is no longer waited for (a stalled or leaked file descriptor
        must not freeze the registry); its content still has to settle, and a
        drastic result still waits for ``hold``.
        """
        if self._events is None:
            return False
        last = self._events.last_open_write([f.name for f in listing])
        return last is not None and time.monotonic() - last < self.hold

    def _settle_for(self, listing: dict[Path, _Stamp]) -> float:
        """The settle window for this change: short when every changed file was renamed in."""
        renamed = True
        for file, stamp in listing.items():
            old = self._stamps.get(file)
            if old == stamp:
                continue
            if old is None or (old.dev, old.ino) == (stamp.dev, stamp.ino):
                renamed = False  # a new name, or written in place: may be half-written
                break
        return min(self.settle, RENAMED_SETTLE_SECONDS) if renamed else self.settle

    async def _settled(self, listing: dict[Path, _Stamp]) -> dict[Path, _Read] | None:
        """The changed files' content once it has stayed the same for the settle window."""
        first = await asyncio.to_thread(self._read_changed, listing)
        await asyncio.sleep(self._settle_for(listing))
        if list_registry_files(self.path) != listing or self._open_for_writing(listing):
            return None
        second = await asyncio.to_thread(self._read_changed, listing)
        if self._digests(second) != self._digests(first):
            return None
        # A write that raced the second read shows in the stamps once more.
        if list_registry_files(self.path) != listing:
            return None
        return second

    async def check(self, *, woken: bool = False) -> bool:
        """One poll: reloads if anything changed. True when a new state was published.

        ``woken`` marks a check triggered by a filesystem event rather than the
        poll timer; such checks never count towards acting on a missing file,
        so a burst of events during an editor's save cannot skip the grace poll.
        """
        listing = list_registry_files(self.path)
        vanished = listing is None or any(f not in listing for f in self._stamps)
        if vanished:
            if woken:
                return False
            self._missing_polls += 1
            if self._missing_polls < _MISSING_POLLS_BEFORE_ACTING:
                return False
            if listing is None:
                if self._missing_polls == _MISSING_POLLS_BEFORE_ACTING:
                    self._holder.report_error(
                        RegistryError(
                            f"registry {self.path} has disappeared",
                            hint="restore it; the controller keeps serving the last valid registry",
                        )
                    )
                self._stamps = {}
                return False
        self._missing_polls = 0
        assert listing is not None
        if listing == self._stamps:
            self._unsettled = False
            return self._apply_held()
        reads = await self._settled(listing)
        if reads is None:
            self._unsettled = True  # still being written: look again after the window
            return False
        self._unsettled = False
        cache, contents, result = await asyncio.to_thread(self._refresh, listing, reads)
        self._stamps, self._cache = listing, cache
        if result is None:
            # Touched or restored, not changed: the files are the current state again.
            if self._tried_ok:
                self._holder.clear_error()
            return self._apply_held()
        self._tried, self._tried_ok = contents, False
        if isinstance(result, RegistryError):
            self._holder.report_error(result)
            return False
        change = diff_states(self._holder.current(), result)
        reasons = change.drastic()
        if reasons:
            self._held = _Held(contents, time.monotonic(), result, change, reasons)
            self._holder.note_held(
                f"{'; '.join(reasons)}: applied once unchanged for {self.hold:g} s"
            )
            log.warning(
                "registry %s: the new version %s (%s); holding it back until the files have "
                "stayed unchanged for %g s, in case this is a torn write",
                self.path,
                " and ".join(reasons),
                change.summary(),
                self.hold,
            )
            return self._apply_held()
        return self._publish(result, change)

    def _apply_held(self) -> bool:
        """Publishes the held-back version once its files have been stable long enough."""
        held = self._held
        if held is None or time.monotonic() - held.since < self.hold:
            return False
        if self._tried != held.contents:
            self._held = None  # replaced by a later version (published or refused)
            self._holder.note_held(None)
            return False
        log.warning(
            "registry %s unchanged for %g s; applying the held-back version that %s",
            self.path,
            self.hold,
            " and ".join(held.reasons),
        )
        return self._publish(held.state, held.change)

    def _publish(self, state: RegistryState, change: RegistryChange) -> bool:
        if self._held is not None:
            self._held = None
            self._holder.note_held(None)
        try:
            self._holder.publish(state, source=str(self.path))
        except RegistryError as e:
            self._holder.report_error(e)
            return False
        self._tried_ok = True
        log.info(
            "registry reloaded from %s: %s (now %s)",
            self.path,
            change.summary(),
            describe_state(state),
        )
        self._note_warnings(state)
        return True

    def _note_warnings(self, state: RegistryState) -> None:
        """Logs warnings not logged before; the holder keeps the full list for status."""
        warnings = registry_warnings(state)
        for w in warnings:
            if w not in self._warnings:
                log.warning("registry %s: %s", self.path, w)
        self._warnings = warnings
        self._holder.set_warnings(warnings)

    async def run(self) -> None:
        """Polls until cancelled, and checks at once when inotify reports a completed write.

        Never raises for a bad registry; reports it instead.
        """
        directory = self.path if self.path.is_dir() else self.path.parent
        self._events = DirectoryEvents.open(directory)
        try:
            while True:
                timeout = self.interval
                if self._unsettled:
                    timeout = min(timeout, self.settle)
                if self._held is not None:
                    left = self._held.since + self.hold - time.monotonic()
                    timeout = min(timeout, max(left, 0.01))
                woken = False
                if self._events is not None:
                    woken = await self._events.wait(timeout)
                else:
                    await asyncio.sleep(timeout)
                try:
                    await self.check(woken=woken)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug here must not stop the watching; the state stays as it is.
                    log.exception("registry watcher failed on %s; retrying", self.path)
        finally:
            if self._events is not None:
                self._events.close()
                self._events = None
