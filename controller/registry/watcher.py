"""Watches the registry (one YAML file, or a directory of them) and publishes each valid version.

Polling, woken early by inotify: a stat every ``interval`` seconds is cheap,
works on every filesystem (including ConfigMap volumes, which swap a symlink),
and follows editors that save by writing a new file and renaming it over the old
one (the inode changes, so the stamp changes); an inotify event on the
directory only makes the next check happen now instead of at the next tick. A file whose stamp changed is read and
hashed; it is parsed only when its content differs from the version cached for
it, so an unchanged broken file is reported once, and in a directory only the
edited file is parsed again. Reading, parsing and assembling run in a worker
thread so a large registry never stalls gRPC serving.

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
from dataclasses import dataclass
from pathlib import Path

from controller.api.model import RegistryState

from .document import decode_document, parse_fragment, read_registry_bytes
from .errors import RegistryError
from .fragments import RegistryFragment, assemble, rebase
from .holder import RegistryHolder, describe_state
from .inotify import DirectoryEvents

__all__ = ["REGISTRY_SUFFIXES", "RegistryFileWatcher", "list_registry_files"]

log = logging.getLogger("veil.controller.registry")

REGISTRY_SUFFIXES = (".yaml", ".yml", ".json")
_MISSING_POLLS_BEFORE_ACTING = 2
_SETTLE_SECONDS = 0.02


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
    """Keeps ``holder`` in step with the registry file or directory at ``path``."""

    def __init__(self, path: Path, holder: RegistryHolder, *, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self._holder = holder
        self._stamps: dict[Path, _Stamp] = {}
        self._cache: dict[Path, _Cached] = {}
        self._tried: tuple[tuple[Path, str], ...] | None = None  # contents last assembled
        self._tried_ok = False  # ... and whether they became the current state
        self._missing_polls = 0

    # -- one pass over the files (runs in a worker thread) -----------------

    def _refresh(
        self, listing: dict[Path, _Stamp]
    ) -> tuple[
        dict[Path, _Cached], tuple[tuple[Path, str], ...], RegistryState | RegistryError | None
    ]:
        cache: dict[Path, _Cached] = {}
        for file, stamp in listing.items():
            old = self._cache.get(file)
            if old is not None and self._stamps.get(file) == stamp:
                cache[file] = old
                continue
            try:
                data = read_registry_bytes(file)
            except RegistryError as e:
                cache[file] = _Cached("", None, e)
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
        cache, contents, result = self._refresh(listing)
        if isinstance(result, RegistryError):
            raise result
        assert result is not None
        self._holder.publish(result, source=str(self.path))
        self._stamps, self._cache, self._tried = listing, cache, contents
        self._tried_ok = True
        return result

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
            return False
        cache, contents, result = await asyncio.to_thread(self._refresh, listing)
        # Stamps are taken before reading: a write racing the read changes the
        # stamp again, so the next poll reads that file once more.
        self._stamps, self._cache = listing, cache
        if result is None:
            # Touched or restored, not changed: the files are the current state again.
            if self._tried_ok:
                self._holder.clear_error()
            return False
        self._tried, self._tried_ok = contents, False
        if isinstance(result, RegistryError):
            self._holder.report_error(result)
            return False
        try:
            self._holder.publish(result, source=str(self.path))
        except RegistryError as e:
            self._holder.report_error(e)
            return False
        self._tried_ok = True
        log.info("registry reloaded from %s: %s", self.path, describe_state(result))
        return True

    async def run(self) -> None:
        """Polls until cancelled, and checks at once when inotify reports a change.

        Never raises for a bad registry; reports it instead.
        """
        directory = self.path if self.path.is_dir() else self.path.parent
        events = DirectoryEvents.open(directory)
        try:
            while True:
                woken = False
                if events is not None:
                    woken = await events.wait(self.interval)
                    if woken:
                        # Let the rest of a save (write, then rename) land first.
                        await asyncio.sleep(_SETTLE_SECONDS)
                else:
                    await asyncio.sleep(self.interval)
                try:
                    await self.check(woken=woken)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug here must not stop the watching; the state stays as it is.
                    log.exception("registry watcher failed on %s; retrying", self.path)
        finally:
            if events is not None:
                events.close()
