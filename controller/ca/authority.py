"""The controller's certificate authority: issuance, trust bundle, root rotation.

:class:`CertificateAuthority` signs with the *active* authority and publishes a
trust bundle holding every root still needed: the active one and the retiring
ones. A retiring root stays until every certificate it signed has expired. To
know when that is without a disk write per certificate, the CA persists an upper
bound (``issued_until``) *before* handing out a certificate that would exceed it,
rounded up by ``issued_slack``; so at most one write per slack period, and the
stored bound is never below a real notAfter, even across a crash.

Rotation (``veil controller ca rotate``) may run in another process; the running
controller picks the change up in :meth:`CertificateAuthority.watch_state_dir`
and tells its listeners (the Discovery hub, the serving-certificate reloader).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.api.errors import ApiError
from controller.api.model import TrustBundle
from controller.api.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, validate_trust_domain
from controller.errors import CaError

from .certs import (
    CLOCK_SKEW,
    build_leaf,
    build_self_signed_root,
    certificate_pem,
    generate_p256_key,
    private_key_pem,
    serving_sans,
    spiffe_san,
)
from .csr import validate_csr
from .material import Signer, import_authority, signer_from_record
from .store import AuthorityRecord, CaState, CaStore, FileCaStore

__all__ = [
    "DEFAULT_ISSUED_SLACK",
    "AuthorityInfo",
    "CertificateAuthority",
    "Clock",
    "IssuedCertificate",
    "controller_identity",
    "prune_expired",
    "utc_now",
]

log = logging.getLogger("veil.controller.ca")

Clock = Callable[[], datetime]
DEFAULT_ISSUED_SLACK = timedelta(hours=1)


def controller_identity(trust_domain: str) -> SpiffeId:
    """``spiffe://<td>/veil/controller``: the URI SAN of controller serving certificates."""
    return SpiffeId(trust_domain, "/veil/controller")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class AuthorityInfo:
    """What ``veil controller ca show`` prints about one root."""

    fingerprint: str  # SHA-256 of the root's DER, lowercase hex
    subject: str
    not_before: datetime
    not_after: datetime
    state: str  # "active" or "retiring"
    source: str  # "generated" or "imported"
    created: datetime
    retired_at: datetime | None
    # Retiring roots leave the bundle after this instant (the last notAfter they signed).
    retire_after: datetime | None
    intermediates: int  # CA certificates between the root and the signer


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    chain_pem: tuple[bytes, ...]  # leaf first, then intermediates (never the root)
    not_after: datetime
    serial: int
    root_fingerprint: str


class _AuthorityGone(Exception):
    """The authority we signed with was removed from the store by another process."""


def prune_expired(state: CaState, now: datetime) -> CaState:
    """Drops retiring authorities whose every certificate has expired (pure)."""
    keep = tuple(
        a
        for a in state.authorities
        if a.active or (a.issued_until is not None and a.issued_until > now)
    )
    if len(keep) == len(state.authorities):
        return state
    return replace(state, authorities=keep, generation=state.generation + 1)


def _generate_record(trust_domain: str, now: datetime) -> AuthorityRecord:
    key = generate_p256_key()
    label = f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    root = build_self_signed_root(key, trust_domain, now, label)
    return AuthorityRecord(
        key_pem=private_key_pem(key),
        cert_pem=certificate_pem(root),
        chain_pem=(),
        source="generated",
        created=now,
    )


def _activate(state: CaState, record: AuthorityRecord, now: datetime) -> CaState:
    """Makes ``record`` the active authority; the previous one starts retiring."""
    for a in state.authorities:
        if a.cert_pem == record.cert_pem:
            # Re-activating a retiring authority: keep what it already signed on record.
            record = replace(record, created=a.created, issued_until=a.issued_until)
    others = tuple(
        a if not a.active else replace(a, retired_at=now)
        for a in state.authorities
        if a.cert_pem != record.cert_pem
    )
    return prune_expired(CaState(state.trust_domain, (record, *others), state.generation + 1), now)


class CertificateAuthority:
    """Signs SVIDs, node and serving certificates; owns the trust bundle."""

    def __init__(
        self,
        store: CaStore,
        state: CaState,
        *,
        clock: Clock = utc_now,
        issued_slack: timedelta = DEFAULT_ISSUED_SLACK,
    ) -> None:
        self._store = store
        self._clock = clock
        self._slack = issued_slack
        self._lock = threading.RLock()
        self._listeners: list[Callable[[TrustBundle], None]] = []
        self._state = state
        self._signer = signer_from_record(state.active)
        self._reserved: dict[bytes, datetime] = {}
        self._bundle = TrustBundle(state.trust_domain, state.bundle_pem())
        self._note_reservations(state)
        self.trust_domain = state.trust_domain

    # ----- construction -------------------------------------------------

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        ca_cert: Path | None = None,
        ca_key: Path | None = None,
        ca_chain: Path | None = None,
        store: CaStore | None = None,
        clock: Clock = utc_now,
        issued_slack: timedelta = DEFAULT_ISSUED_SLACK,
    ) -> CertificateAuthority:
        """Opens the CA in ``state_dir``, creating a self-signed P-256 root on first use.

        With ``ca_cert``/``ca_key`` (and optionally ``ca_chain``) the supplied CA is
        imported and becomes the active authority; a different authority that was
        active before keeps retiring in the bundle until its certificates expire.
        """
        validate_trust_domain(trust_domain)
        if (ca_cert is None) != (ca_key is None) or (ca_chain is not None and ca_cert is None):
            raise CaError(
                "a user-supplied CA needs both --ca-cert and --ca-key (and --ca-chain only with them)",
                hint="pass --ca-cert and --ca-key together, or neither to use a generated root",
            )
        store = store or FileCaStore(state_dir)
        now = clock()
        imported = (
            import_authority(ca_cert, ca_key, ca_chain, now)
            if ca_cert is not None and ca_key is not None
            else None
        )

        def change(cur: CaState | None) -> CaState:
            if cur is None:
                record = imported or _generate_record(trust_domain, now)
                log.info("created CA for trust domain %s (%s root)", trust_domain, record.source)
                return CaState(trust_domain, (record,), 1)
            if cur.trust_domain != trust_domain:
                raise CaError(
                    f"the CA in {state_dir} belongs to trust domain {cur.trust_domain!r}, not "
                    f"{trust_domain!r}",
                    hint="use the trust domain the CA was created with, or a new state directory",
                )
            if imported is not None and imported.cert_pem != cur.active.cert_pem:
                log.info("importing the supplied CA as the new active authority")
                return _activate(cur, imported, now)
            return prune_expired(cur, now)

        return cls(store, store.update(change), clock=clock, issued_slack=issued_slack)

    @classmethod
    def load(
        cls,
        state_dir: Path,
        *,
        store: CaStore | None = None,
        clock: Clock = utc_now,
        issued_slack: timedelta = DEFAULT_ISSUED_SLACK,
    ) -> CertificateAuthority:
        """Opens an existing CA; raises CaError when ``state_dir`` has none."""
        store = store or FileCaStore(state_dir)
        state = store.load()
        if state is None:
            raise CaError(
                f"no CA in {state_dir}",
                hint="start the controller once (`veil controller run --state-dir DIR ...`) or "
                "create the CA with `veil controller ca init --state-dir DIR`",
            )
        return cls(store, state, clock=clock, issued_slack=issued_slack)

    # ----- what others read ----------------------------------------------

    @property
    def fingerprint(self) -> str:
        """The active root's SHA-256 fingerprint (what join tokens carry)."""
        return self._signer.root_fingerprint

    @property
    def generation(self) -> int:
        return self._state.generation

    def trust_bundle(self) -> TrustBundle:
        return self._bundle

    def authorities(self) -> tuple[AuthorityInfo, ...]:
        infos = []
        for record in self._state.authorities:
            signer = self._signer if record is self._signer.record else signer_from_record(record)
            infos.append(
                AuthorityInfo(
                    fingerprint=signer.root_fingerprint,
                    subject=signer.root.subject.rfc4514_string(),
                    not_before=signer.root.not_valid_before_utc,
                    not_after=signer.root.not_valid_after_utc,
                    state="active" if record.active else "retiring",
                    source=record.source,
                    created=record.created,
                    retired_at=record.retired_at,
                    retire_after=None if record.active else record.issued_until,
                    intermediates=len(signer.intermediates_pem),
                )
            )
        return tuple(infos)

    def add_listener(self, callback: Callable[[TrustBundle], None]) -> None:
        """``callback(bundle)`` runs whenever the set of roots changes."""
        self._listeners.append(callback)

    # ----- issuance --------------------------------------------------------

    def sign_csr(self, csr_pem: bytes, identity: SpiffeId, ttl: timedelta) -> tuple[bytes, ...]:
        """Validates the CSR against ``identity`` and returns the PEM chain, leaf first."""
        return self.issue(csr_pem, identity, ttl).chain_pem

    def issue(self, csr_pem: bytes, identity: SpiffeId, ttl: timedelta) -> IssuedCertificate:
        if identity.trust_domain != self.trust_domain:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"identity {identity} is outside this CA's trust domain {self.trust_domain}",
            )
        public_key = validate_csr(csr_pem, identity)
        cert, signer = self._sign(public_key, spiffe_san(identity), ttl, None, str(identity))
        return IssuedCertificate(
            chain_pem=(certificate_pem(cert), *signer.intermediates_pem),
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
            root_fingerprint=signer.root_fingerprint,
        )

    def issue_serving_certificate(
        self, dns_names: Sequence[str], ips: Sequence[str], ttl: timedelta
    ) -> tuple[bytes, bytes]:
        """A TLS server certificate for the controller: (key PEM, chain PEM incl. the root).

        Besides the DNS names and IPs it carries the URI SAN
        ``spiffe://<td>/veil/controller``. The root is in the chain on purpose: a joining node fetches it over a raw
        TLS handshake and pins it by the fingerprint in its join token.
        """
        if not dns_names and not ips:
            raise CaError("a serving certificate needs at least one DNS name or IP address")
        key = generate_p256_key()
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, (list(dns_names) or list(ips))[0][:64])]
        )
        # The URI SAN tells a joining node the trust domain before it has any credential.
        sans = [*serving_sans(dns_names, ips), *spiffe_san(controller_identity(self.trust_domain))]
        cert, signer = self._sign(key.public_key(), sans, ttl, subject, "serving certificate")
        chain = (certificate_pem(cert), *signer.intermediates_pem, signer.root_pem)
        return private_key_pem(key), b"".join(chain)

    def _sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        sans: Sequence[x509.GeneralName],
        ttl: timedelta,
        subject: x509.Name | None,
        what: str,
    ) -> tuple[x509.Certificate, Signer]:
        if ttl <= timedelta(0):
            raise CaError(f"certificate lifetime must be positive, got {ttl}")
        now = self._clock()
        signer = self._signer
        not_after = now + ttl
        if not_after > signer.not_after_limit:
            not_after = signer.not_after_limit
            log.warning(
                "clamping %s lifetime to the CA's own expiry %s; rotate the CA soon",
                what,
                not_after.isoformat(),
            )
        if not_after <= now:
            raise CaError(
                f"the signing CA expired at {signer.not_after_limit.isoformat()}",
                hint="rotate the CA: `veil controller ca rotate --state-dir DIR`",
            )
        signer = self._reserve(signer, not_after)
        cert = build_leaf(
            public_key=public_key,
            sans=sans,
            issuer=signer.cert,
            issuer_key=signer.key,
            issuer_ski=signer.ski,
            not_before=now - CLOCK_SKEW,
            not_after=not_after,
            subject=subject,
        )
        return cert, signer

    def _reserve(self, signer: Signer, not_after: datetime) -> Signer:
        """Persists ``issued_until >= not_after`` for the signer before it signs.

        Returns the signer to use: the same one, or the new active authority when
        another process removed ours meanwhile.
        """
        with self._lock:
            for _ in range(3):
                reserved = self._reserved.get(signer.record.cert_pem)
                if reserved is not None and reserved >= not_after:
                    return signer
                target = not_after + self._slack
                cert_pem = signer.record.cert_pem

                def bump(
                    cur: CaState | None, cert_pem: bytes = cert_pem, target: datetime = target
                ) -> CaState:
                    if cur is None or not any(a.cert_pem == cert_pem for a in cur.authorities):
                        raise _AuthorityGone
                    return replace(
                        cur,
                        authorities=tuple(
                            replace(a, issued_until=max(a.issued_until or target, target))
                            if a.cert_pem == cert_pem
                            else a
                            for a in cur.authorities
                        ),
                    )

                try:
                    state = self._store.update(bump)
                except _AuthorityGone:
                    log.warning("signing authority was replaced by another process; reloading")
                    self.reload()
                    signer = self._signer
                    continue
                self._apply(state)
                return signer
        raise CaError("the CA state keeps changing under the controller; retry")

    # ----- state changes ---------------------------------------------------

    def _note_reservations(self, state: CaState) -> None:
        for a in state.authorities:
            if a.issued_until is not None:
                prev = self._reserved.get(a.cert_pem)
                self._reserved[a.cert_pem] = max(prev, a.issued_until) if prev else a.issued_until

    def _apply(self, state: CaState) -> None:
        """Adopts ``state``; notifies listeners when the set of roots changed."""
        with self._lock:
            if state.trust_domain != self.trust_domain:
                raise CaError(
                    f"the CA state now names trust domain {state.trust_domain!r}, not "
                    f"{self.trust_domain!r}",
                    hint="restart the controller with the right trust domain",
                )
            self._note_reservations(state)
            if state.active.cert_pem != self._signer.record.cert_pem:
                self._signer = signer_from_record(state.active)
                log.info("now signing with root %s", self._signer.root_fingerprint[:16])
            else:
                self._signer = replace(self._signer, record=state.active)
            self._state = state
            bundle = TrustBundle(state.trust_domain, state.bundle_pem())
            changed = bundle != self._bundle
            self._bundle = bundle
        if changed:
            log.info("trust bundle now holds %d root(s)", len(bundle.roots))
            for callback in list(self._listeners):
                try:
                    callback(bundle)
                except Exception:  # a broken listener must not stop issuance
                    log.exception("trust bundle listener failed")

    def reload(self) -> bool:
        """Re-reads the store; returns True when the trust bundle changed."""
        state = self._store.load()
        if state is None:
            raise CaError("the CA state disappeared from the store", hint="restore it from backup")
        before = self._bundle
        self._apply(state)
        return self._bundle != before

    def rotate(
        self,
        *,
        ca_cert: Path | None = None,
        ca_key: Path | None = None,
        ca_chain: Path | None = None,
    ) -> AuthorityInfo:
        """Adds a new root (generated, or the supplied CA) and signs with it from now on.

        The previous root stays in the trust bundle until its last certificate expires.
        """
        if (ca_cert is None) != (ca_key is None):
            raise CaError("rotating to a supplied CA needs both --ca-cert and --ca-key")
        now = self._clock()
        record = (
            import_authority(ca_cert, ca_key, ca_chain, now)
            if ca_cert is not None and ca_key is not None
            else _generate_record(self.trust_domain, now)
        )

        def change(cur: CaState | None) -> CaState:
            if cur is None:
                raise CaError("the CA state disappeared from the store")
            return _activate(cur, record, now)

        with self._lock:
            self._apply(self._store.update(change))
            return self.authorities()[0]

    def prune(self) -> bool:
        """Removes retiring roots whose certificates have all expired; True if any went."""
        now = self._clock()
        if not any(
            not a.active and (a.issued_until is None or a.issued_until <= now)
            for a in self._state.authorities
        ):
            return False
        before = self._bundle
        with self._lock:
            self._apply(self._store.update(lambda cur: prune_expired(self._must(cur), now)))
        return self._bundle != before

    @staticmethod
    def _must(state: CaState | None) -> CaState:
        if state is None:
            raise CaError("the CA state disappeared from the store", hint="restore it from backup")
        return state

    async def watch_state_dir(self, interval: float = 2.0) -> None:
        """Runs forever: picks up rotations made by other processes and prunes old roots."""
        while True:
            await asyncio.sleep(interval)
            try:
                state = await asyncio.to_thread(self._store.load)
                if state is not None and state.generation != self._state.generation:
                    self._apply(state)
                self.prune()
            except CaError as e:
                # Keep serving with what we have; the operator sees the error in the log.
                log.error("CA state check failed: %s", e)
