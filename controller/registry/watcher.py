"""Watches the YAML registry file and publishes each valid version of it.

Polling, not inotify: a stat every ``interval`` seconds is cheap, works on every
filesystem (including ConfigMap volumes, which swap a symlink), and follows
editors that save by writing a new file and renaming it over the old one (the
inode changes, so the stamp changes). When the stamp changes the file is read
and hashed; it is parsed only when the content differs from the last version
tried, so an unchanged broken file is reported once, not every poll. Reading
and parsing run in a worker thread so a large file never stalls gRPC serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from controller.api.model import RegistryState

from .document import parse_registry_bytes, read_registry_bytes
from .errors import RegistryError
from .holder import RegistryHolder, describe_state

__all__ = ["RegistryFileWatcher"]

log = logging.getLogger("veil.controller.registry")

# Editors that save by "rename the old file away, write the new one" leave a
# moment with no file; only a file missing on this many polls in a row is an error.
_MISSING_POLLS_BEFORE_ERROR = 2


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
class _Read:
    digest: str
    state: RegistryState | None
    error: RegistryError | None


class RegistryFileWatcher:
    """Keeps ``holder`` in step with the registry file at ``path``."""

    def __init__(self, path: Path, holder: RegistryHolder, *, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self._holder = holder
        self._stamp: _Stamp | None = None
        self._digest: str | None = None  # of the last content tried, good or bad
        self._missing_polls = 0

    def load_initial(self) -> RegistryState:
        """Reads, validates and publishes the file once; raises RegistryError if invalid.

        At startup there is no previous state to fall back on, so an invalid
        file stops the controller with the error instead of serving nothing.
        """
        stamp = self._stat()
        data = read_registry_bytes(self.path)
        state = parse_registry_bytes(data, str(self.path))
        self._holder.publish(state, source=str(self.path))
        self._stamp = stamp
        self._digest = hashlib.sha256(data).hexdigest()
        return state

    def _stat(self) -> _Stamp | None:
        try:
            return _Stamp.of(os.stat(self.path))
        except OSError:
            return None

    def _read(self, previous_digest: str | None) -> _Read:
        try:
            data = read_registry_bytes(self.path)
        except RegistryError as e:
            return _Read("", None, e)
        digest = hashlib.sha256(data).hexdigest()
        if digest == previous_digest:
            return _Read(digest, None, None)
        try:
            state = parse_registry_bytes(data, str(self.path))
        except RegistryError as e:
            return _Read(digest, None, e)
        return _Read(digest, state, None)

    async def check(self) -> bool:
        """One poll: reloads if the file changed. True when a new state was published."""
        stamp = self._stat()
        if stamp is None:
            self._missing_polls += 1
            if self._missing_polls == _MISSING_POLLS_BEFORE_ERROR:
                self._holder.report_error(
                    RegistryError(
                        f"registry file {self.path} has disappeared",
                        hint="restore the file; the controller keeps serving the last valid registry",
                    )
                )
            self._stamp = None
            return False
        self._missing_polls = 0
        if stamp == self._stamp:
            return False
        result = await asyncio.to_thread(self._read, self._digest)
        # The stamp is taken before reading: a write racing the read changes the
        # stamp again, so the next poll reads the file once more.
        self._stamp = stamp
        if result.digest and result.digest == self._digest:
            return False
        self._digest = result.digest or None
        if result.error is not None:
            self._holder.report_error(result.error)
            return False
        assert result.state is not None
        try:
            self._holder.publish(result.state, source=str(self.path))
        except RegistryError as e:
            self._holder.report_error(e)
            return False
        log.info("registry reloaded from %s: %s", self.path, describe_state(result.state))
        return True

    async def run(self) -> None:
        """Polls until cancelled. Never raises for a bad file; reports it instead."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not stop the watching; the state stays as it is.
                log.exception("registry watcher failed on %s; retrying", self.path)
