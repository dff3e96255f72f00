"""CertManager: one valid certificate per local workload identity, kept fresh.

For every identity it is asked to track, the manager runs one worker task, so
there is never more than one request in flight per identity. The worker:

- requests a certificate when there is none, and again at half-life;
- on failure retries with capped, jittered exponential backoff and keeps
  serving the certificate it holds until that expires;
- drops an expired certificate (``get`` returns None from then on);
- refreshes at once when a new trust bundle no longer validates the one held;
- requests at once, whatever its retry timer says, when the controller is
  reachable again after an outage (:meth:`CertManager.on_reconnect`, hooked
  to the controller channel), so certificates that lapsed during the outage
  are back within a round trip instead of after the longest backoff.

Identities come from the state store: :meth:`CertManager.on_state_change` is a
:class:`~node.state.StateStore` subscriber that starts workers for new local
workloads (prefetch) and stops them for workloads that left. ``fetch`` also
starts a worker on demand and waits for the first result.

Keys are generated here, kept in memory, and optionally written as 0600 files
to ``key_dir``; they are never sent anywhere. Time is injectable
(:class:`Clock`) so tests can run a day of rotations in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from controller.api.errors import ApiError
from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from node.backoff import Backoff
from node.state.store import StateChange
from veil.files import atomic_write

from ..errors import CertificateError
from .certificate import (
    WorkloadCertificate,
    build_csr,
    chain_still_trusted,
    generate_key,
    verify_issued,
)

__all__ = ["CertManager", "CertStatus", "CertificateSigner", "Clock", "SystemClock"]

log = logging.getLogger("veil.ztunnel.identity")


class CertificateSigner(Protocol):
    """What the manager needs from the controller (``ControllerClient`` satisfies it)."""

    async def create_certificate(
        self, csr_pem: bytes, identity: str, ttl_seconds: int = 0, timeout: float = 10.0
    ) -> tuple[bytes, ...]: ...


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class CertStatus:
    """One identity's certificate state for ``/config_dump`` (never the key)."""

    identity: SpiffeId
    state: str  # "valid", "pending" (none yet) or "expired"
    certificate: WorkloadCertificate | None
    last_error: str | None
    failures: int
    next_attempt_at: datetime | None

    def to_json(self, now: datetime) -> dict[str, object]:
        out: dict[str, object] = {"identity": str(self.identity), "state": self.state}
        if self.certificate is not None:
            out.update(self.certificate.to_json(now))
        out["last_error"] = self.last_error
        out["failures"] = self.failures
        out["next_attempt_at"] = self.next_attempt_at.isoformat() if self.next_attempt_at else None
        return out


@dataclass(eq=False)
class _Slot:
    identity: SpiffeId
    backoff: Backoff
    cert: WorkloadCertificate | None = None
    task: asyncio.Task[None] | None = None
    last_error: str | None = None
    failures: int = 0
    next_attempt_at: datetime | None = None
    waiters: list[asyncio.Future[WorkloadCertificate]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class CertManager:
    def __init__(
        self,
        signer: CertificateSigner,
        trust_bundle: Callable[[], TrustBundle | None],
        *,
        ttl: timedelta | None = None,
        clock: Clock | None = None,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        request_timeout: float = 10.0,
        key_dir: Path | None = None,
    ) -> None:
        """``trust_bundle`` returns the roots to check answers against (the
        state's bundle, or the one stored at join before the first snapshot)."""
        self._signer = signer
        self._trust_bundle = trust_bundle
        self._ttl = ttl
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._retry = (retry_initial, retry_max)
        self._timeout = request_timeout
        self._key_dir = key_dir
        self._slots: dict[SpiffeId, _Slot] = {}
        self._closed = False

    # -- queries -----------------------------------------------------------------

    def get(self, identity: SpiffeId) -> WorkloadCertificate | None:
        """The current certificate for ``identity`` if one is held and unexpired."""
        slot = self._slots.get(identity)
        if slot is None or slot.cert is None or slot.cert.expired(self._clock.now()):
            return None
        return slot.cert

    def tracked(self) -> frozenset[SpiffeId]:
        return frozenset(self._slots)

    def has_all(self, identities: Iterable[SpiffeId]) -> bool:
        """True when every identity has a valid certificate (readiness)."""
        return all(self.get(i) is not None for i in identities)

    def statuses(self) -> list[CertStatus]:
        """Every tracked identity, sorted, without keys."""
        now = self._clock.now()
        out = []
        for ident in sorted(self._slots, key=str):
            s = self._slots[ident]
            if s.cert is None:
                state = "pending"
            elif s.cert.expired(now):
                state = "expired"
            else:
                state = "valid"
            out.append(
                CertStatus(ident, state, s.cert, s.last_error, s.failures, s.next_attempt_at)
            )
        return out

    def dump(self) -> list[dict[str, object]]:
        now = self._clock.now()
        return [s.to_json(now) for s in self.statuses()]

    # -- tracking ----------------------------------------------------------------

    async def fetch(self, identity: SpiffeId, timeout: float | None = None) -> WorkloadCertificate:
        """A valid certificate for ``identity``, waiting for the first one if needed.

        Starts tracking ``identity`` when it is not tracked yet. Raises
        :class:`~ztunnel.errors.CertificateError` when the next attempt fails
        while no valid certificate is held, or on timeout.
        """
        cert = self.get(identity)
        if cert is not None:
            return cert
        slot = self._track(identity)
        fut: asyncio.Future[WorkloadCertificate] = asyncio.get_running_loop().create_future()
        slot.waiters.append(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise CertificateError(
                f"no certificate for {identity} after {timeout}s"
                + (f" (last error: {slot.last_error})" if slot.last_error else ""),
                hint="check the controller is reachable and the workload runs on this node",
            ) from None
        finally:
            if fut in slot.waiters:
                slot.waiters.remove(fut)

    def sync(self, identities: Iterable[SpiffeId]) -> None:
        """Tracks exactly ``identities``: starts new workers, stops and forgets the rest."""
        wanted = set(identities)
        for ident in wanted - set(self._slots):
            self._track(ident)
        for ident in set(self._slots) - wanted:
            self._untrack(ident)

    def on_state_change(self, change: StateChange) -> None:
        """State store subscriber: follow the node's local enrolled workloads."""
        if self._closed:
            return
        self.sync(change.new.local_identities())
        if change.trust_bundle_changed and change.new.trust_bundle is not None:
            self._recheck_bundle(change.new.trust_bundle)

    def refresh(self, identity: SpiffeId) -> None:
        """Asks for a new certificate now (e.g. the peer rejected ours)."""
        slot = self._slots.get(identity)
        if slot is not None:
            slot.next_attempt_at = self._clock.now()
            slot.wake.set()

    def on_reconnect(self) -> None:
        """The controller is reachable again: request every missing, expired or
        overdue certificate now instead of when its retry timer fires.

        An outage leaves each identity's retry delay near ``retry_max``; the
        workloads whose certificates lapsed meanwhile must not wait for it.
        """
        if self._closed:
            return
        now = self._clock.now()
        woken = 0
        for slot in self._slots.values():
            cert = slot.cert
            if cert is not None and not cert.expired(now) and now < cert.rotation_due:
                continue
            if slot.next_attempt_at is None or slot.next_attempt_at <= now:
                continue  # already due: the worker is requesting or about to
            slot.backoff.reset()
            slot.next_attempt_at = now
            slot.wake.set()
            woken += 1
        if woken:
            log.info("controller reachable again: requesting %d certificate(s) now", woken)

    async def close(self) -> None:
        """Stops every worker and removes key files; held certificates are forgotten."""
        self._closed = True
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        for ident in list(self._slots):
            self._untrack(ident)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def _track(self, identity: SpiffeId) -> _Slot:
        if self._closed:
            raise CertificateError("the certificate manager is shut down")
        slot = self._slots.get(identity)
        if slot is None:
            slot = _Slot(identity, Backoff(*self._retry))
            self._slots[identity] = slot
            slot.task = asyncio.get_running_loop().create_task(
                self._worker(slot), name=f"veil-cert:{identity}"
            )
            log.info("tracking certificate for %s", identity)
        return slot

    def _untrack(self, identity: SpiffeId) -> None:
        slot = self._slots.pop(identity, None)
        if slot is None:
            return
        if slot.task is not None:
            slot.task.cancel()
        for fut in slot.waiters:
            if not fut.done():
                fut.set_exception(
                    CertificateError(f"{identity} is no longer a workload of this node")
                )
        self._remove_files(identity)
        log.info("stopped tracking certificate for %s", identity)

    def _recheck_bundle(self, bundle: TrustBundle) -> None:
        now = self._clock.now()
        for slot in self._slots.values():
            if slot.cert is not None and not chain_still_trusted(slot.cert, bundle, now):
                log.warning(
                    "certificate for %s no longer chains to the new trust bundle; renewing",
                    slot.identity,
                )
                self.refresh(slot.identity)

    # -- the worker --------------------------------------------------------------

    async def _worker(self, slot: _Slot) -> None:
        while True:
            now = self._clock.now()
            cert = slot.cert
            if cert is not None and cert.expired(now):
                log.error(
                    "certificate for %s expired at %s; connections as this identity fail "
                    "until a new one is issued",
                    slot.identity,
                    cert.not_after.isoformat(),
                )
                slot.cert = None
                cert = None
            due = slot.next_attempt_at
            if due is None:
                due = cert.rotation_due if cert is not None else now
            if now < due:
                await self._sleep(slot, (due - now).total_seconds())
                continue
            try:
                new = await self._request(slot.identity)
            except (CertificateError, ApiError) as e:
                self._failed(slot, str(e))
                continue
            except Exception as e:
                log.exception("certificate request for %s failed unexpectedly", slot.identity)
                self._failed(slot, f"{type(e).__name__}: {e}")
                continue
            slot.cert = new
            slot.last_error = None
            slot.failures = 0
            slot.backoff.reset()
            slot.next_attempt_at = None
            self._write_files(new)
            log.info(
                "certificate for %s issued: serial %s valid until %s, rotation at %s",
                slot.identity,
                new.serial_hex,
                new.not_after.isoformat(),
                new.rotation_due.isoformat(),
            )
            for fut in slot.waiters:
                if not fut.done():
                    fut.set_result(new)

    def _failed(self, slot: _Slot, reason: str) -> None:
        slot.failures += 1
        slot.last_error = reason
        delay = slot.backoff.next()
        now = self._clock.now()
        slot.next_attempt_at = now + timedelta(seconds=delay)
        held = slot.cert is not None and not slot.cert.expired(now)
        log.warning(
            "certificate request for %s failed (%s); %s; retrying in %.1fs",
            slot.identity,
            reason,
            "keeping the current certificate" if held else "no valid certificate held",
            delay,
        )
        if not held:
            for fut in slot.waiters:
                if not fut.done():
                    fut.set_exception(
                        CertificateError(f"no certificate for {slot.identity}: {reason}")
                    )

    async def _sleep(self, slot: _Slot, seconds: float) -> None:
        """Sleeps ``seconds`` unless woken by :meth:`refresh`."""
        slot.wake.clear()
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(slot.wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def _request(self, identity: SpiffeId) -> WorkloadCertificate:
        bundle = self._trust_bundle()
        if bundle is None or not bundle.roots:
            raise CertificateError(
                f"cannot request a certificate for {identity}: no trust bundle yet",
                hint="the node needs its join credentials or the controller's first snapshot",
            )
        key = generate_key()
        csr = build_csr(key, identity)
        ttl = int(self._ttl.total_seconds()) if self._ttl is not None else 0
        chain = await self._signer.create_certificate(
            csr, str(identity), ttl_seconds=ttl, timeout=self._timeout
        )
        return verify_issued(chain, identity, key, bundle, self._clock.now())

    # -- optional key files ------------------------------------------------------

    def _paths(self, identity: SpiffeId) -> tuple[Path, Path] | None:
        if self._key_dir is None:
            return None
        # '~' cannot occur in a trust domain or SPIFFE path segment, so the
        # name is unambiguous.
        stem = identity.trust_domain + identity.path.replace("/", "~")
        return self._key_dir / f"{stem}.key", self._key_dir / f"{stem}.crt"

    def _write_files(self, cert: WorkloadCertificate) -> None:
        paths = self._paths(cert.identity)
        if paths is None:
            return
        key_path, crt_path = paths
        key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(key_path, cert.key_pem, 0o600)
        atomic_write(crt_path, b"".join(cert.chain_pem), 0o644)

    def _remove_files(self, identity: SpiffeId) -> None:
        paths = self._paths(identity)
        for p in paths or ():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
