"""Persistence of CA material: the :class:`CaStore` protocol and its file implementation.

The CA's whole persistent state is one :class:`CaState` value: the trust domain
and the signing authorities (the active one first, then retiring ones kept in
the trust bundle until every certificate they signed has expired). Changes go
through :meth:`CaStore.update`, an atomic read-modify-write, because the running
controller and ``veil controller ca rotate`` in another process both write it.
A Kubernetes Secret store can implement the same two methods with optimistic
concurrency on the Secret's resourceVersion.

On disk (:class:`FileCaStore`): ``<state-dir>/ca/ca.json`` (0600; holds the
private keys), ``<state-dir>/ca/bundle.pem`` (0644; the trust bundle, for
``openssl verify`` and humans) and ``<state-dir>/ca/.lock``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from controller.errors import CaError
from veil.files import atomic_write, exclusive_lock

__all__ = ["AuthorityRecord", "CaState", "CaStore", "FileCaStore"]

_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class AuthorityRecord:
    """One signing authority: its key, its certificate and the chain up to a root."""

    key_pem: bytes
    cert_pem: bytes  # the certificate whose key is key_pem (the signer)
    chain_pem: tuple[bytes, ...]  # issuers above cert_pem up to the root; empty if cert is the root
    source: str  # "generated" or "imported"
    created: datetime
    retired_at: datetime | None = None  # None: this is the active authority
    # Upper bound of the notAfter of every certificate this authority signed:
    # the authority's root leaves the trust bundle only after this instant.
    issued_until: datetime | None = None

    @property
    def root_pem(self) -> bytes:
        return self.chain_pem[-1] if self.chain_pem else self.cert_pem

    @property
    def active(self) -> bool:
        return self.retired_at is None


@dataclass(frozen=True, slots=True)
class CaState:
    trust_domain: str
    authorities: tuple[AuthorityRecord, ...]  # exactly one active, first
    generation: int = 0  # bumped whenever the set of authorities changes

    @property
    def active(self) -> AuthorityRecord:
        return self.authorities[0]

    def bundle_pem(self) -> tuple[bytes, ...]:
        roots: list[bytes] = []
        for a in self.authorities:
            if a.root_pem not in roots:
                roots.append(a.root_pem)
        return tuple(roots)


class CaStore(Protocol):
    """Where CA material lives. ``update`` must be atomic across processes."""

    def load(self) -> CaState | None: ...

    def update(self, change: Callable[[CaState | None], CaState]) -> CaState: ...


def _dt(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise CaError(f"{where}: {value!r} is not an ISO-8601 time") from None


def _record_to_json(a: AuthorityRecord) -> dict[str, Any]:
    return {
        "key_pem": a.key_pem.decode(),
        "cert_pem": a.cert_pem.decode(),
        "chain_pem": [c.decode() for c in a.chain_pem],
        "source": a.source,
        "created": a.created.isoformat(),
        "retired_at": a.retired_at.isoformat() if a.retired_at else None,
        "issued_until": a.issued_until.isoformat() if a.issued_until else None,
    }


def _record_from_json(d: dict[str, Any], where: str) -> AuthorityRecord:
    created = _dt(d.get("created"), where)
    if created is None:
        raise CaError(f"{where}: authority has no creation time")
    return AuthorityRecord(
        key_pem=str(d["key_pem"]).encode(),
        cert_pem=str(d["cert_pem"]).encode(),
        chain_pem=tuple(str(c).encode() for c in d.get("chain_pem", [])),
        source=str(d.get("source", "generated")),
        created=created,
        retired_at=_dt(d.get("retired_at"), where),
        issued_until=_dt(d.get("issued_until"), where),
    )


def state_to_json(state: CaState) -> bytes:
    doc = {
        "version": _FORMAT_VERSION,
        "trust_domain": state.trust_domain,
        "generation": state.generation,
        "authorities": [_record_to_json(a) for a in state.authorities],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def state_from_json(data: bytes, where: str) -> CaState:
    try:
        doc = json.loads(data)
        if doc.get("version") != _FORMAT_VERSION:
            raise CaError(
                f"{where}: unsupported CA state format {doc.get('version')!r}",
                hint=f"this Veil reads format {_FORMAT_VERSION}; use the Veil version that wrote it",
            )
        state = CaState(
            trust_domain=str(doc["trust_domain"]),
            authorities=tuple(_record_from_json(a, where) for a in doc["authorities"]),
            generation=int(doc.get("generation", 0)),
        )
    except CaError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CaError(
            f"{where} is not a valid Veil CA state file ({type(e).__name__}: {e})",
            hint="restore it from backup; deleting it creates a new CA that no node trusts",
        ) from None
    if not state.authorities or not state.authorities[0].active:
        raise CaError(
            f"{where} has no active signing authority",
            hint="run `veil controller ca rotate --state-dir DIR` to create one",
        )
    return state


class FileCaStore:
    """CA state in ``<state_dir>/ca/``; safe to share between processes."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / "ca"
        self.path = self.directory / "ca.json"
        self.bundle_path = self.directory / "bundle.pem"
        self._lock_path = self.directory / ".lock"

    def load(self) -> CaState | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CaError(f"cannot read {self.path}: {e.strerror}") from None
        return state_from_json(data, str(self.path))

    def update(self, change: Callable[[CaState | None], CaState]) -> CaState:
        try:
            with exclusive_lock(self._lock_path):
                new = change(self.load())
                atomic_write(self.path, state_to_json(new), 0o600)
                atomic_write(self.bundle_path, b"".join(new.bundle_pem()), 0o644)
        except OSError as e:
            raise CaError(
                f"cannot write the CA state in {self.directory}: {e.strerror}",
                hint="check that the state directory exists and is writable by this user",
            ) from None
        return new
