"""The CA in Kubernetes: a :class:`controller.ca.CaStore` on a Secret, and plugged-in CAs.

**Secret store.** The CA state (signing authorities with their keys, as the file
store's JSON) lives in the Secret ``veil-system/veil-ca``, key ``ca.json``; the
public bundle rides along as ``root-cert.pem``. Both controller replicas load
the same CA from it, so a node can be served by either. ``update`` is an
optimistic read-modify-write: GET, apply the change, then POST (absent) or PUT
with the Secret's resourceVersion; a 409 means another replica wrote first and
the change is applied again to what it wrote. Two replicas can therefore never
create two different CAs, even in the moment where both think they lead. Only the
leader may create the Secret (``may_create``); a standby waits for it.

``CaStore`` is a synchronous protocol (the CA signs inside a lock), while the
Kubernetes client is asynchronous. The store runs its own event loop on a
private thread with its own API client, and the synchronous methods wait for it
with a timeout. Writes are rare (creation, rotation, and an hourly reservation
of certificate lifetimes), so the brief wait is acceptable.

**Plugged-in CA.** When the Secret ``veil-system/cacerts`` exists (Istio's
layout: ``ca-cert.pem``, ``ca-key.pem``, optional ``cert-chain.pem`` and
``root-cert.pem``), it takes precedence: :func:`read_plugged_ca` reads it and
:func:`plugged_ca_files` hands it to ``CertificateAuthority.load_or_create`` as
the user-supplied CA, which becomes the active authority while a previously
generated root keeps verifying until its certificates expire.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.ca import CaState
from controller.ca.store import state_from_json, state_to_json
from controller.errors import CaError

from .client import JsonObject, KubeClient
from .errors import KubernetesError
from .kinds import SECRETS

__all__ = [
    "CA_SECRET",
    "PLUGGED_CA_SECRET",
    "CaSecretUnavailable",
    "PluggedCa",
    "SecretCaStore",
    "plugged_ca_files",
    "read_plugged_ca",
]

CA_SECRET = "veil-ca"
PLUGGED_CA_SECRET = "cacerts"
_STATE_KEY = "ca.json"
_BUNDLE_KEY = "root-cert.pem"
_LABELS = {"app.kubernetes.io/part-of": "veil", "app.kubernetes.io/component": "ca"}

T = TypeVar("T")


class CaSecretUnavailable(CaError):
    """The CA Secret cannot be read or written right now (API trouble, or not created yet).

    Transient: the caller keeps serving with the CA it has, or retries at startup.
    """


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _secret_bytes(secret: JsonObject, key: str) -> bytes | None:
    data = secret.get("data") or {}
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        return None


class SecretCaStore:
    """:class:`controller.ca.CaStore` on ``<namespace>/<name>``; see the module docstring."""

    def __init__(
        self,
        client_factory: Callable[[], KubeClient],
        namespace: str = "veil-system",
        name: str = CA_SECRET,
        *,
        may_create: Callable[[], bool] = lambda: True,
        timeout: float = 20.0,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._may_create = may_create
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"secret-store-{name}", daemon=True
        )
        self._thread.start()
        self._client: KubeClient = self._call(self._make_client(client_factory))
        self.writes = 0

    @staticmethod
    async def _make_client(factory: Callable[[], KubeClient]) -> KubeClient:
        return factory()  # created on the store's own loop, which its HTTP session binds to

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise CaError("the CA Secret store is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._timeout)
        except FutureTimeout:
            future.cancel()
            raise CaSecretUnavailable(
                f"the Kubernetes API did not answer within {self._timeout:.0f}s while reading or "
                f"writing the CA Secret {self.namespace}/{self.name}",
                hint="check the API server; the controller keeps serving with the CA it has",
            ) from None

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(CaError):
            self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    # -- CaStore -----------------------------------------------------------------------

    def _parse(self, secret: JsonObject) -> CaState:
        where = f"Secret {self.namespace}/{self.name}"
        data = _secret_bytes(secret, _STATE_KEY)
        if data is None:
            raise CaError(
                f"{where} has no readable {_STATE_KEY!r} entry",
                hint="restore the Secret from backup; deleting it creates a new CA no node trusts",
            )
        return state_from_json(data, where)

    def _body(self, state: CaState, resource_version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace, "labels": _LABELS}
        if resource_version:
            meta["resourceVersion"] = resource_version
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta,
            "type": "Opaque",
            "data": {
                _STATE_KEY: _b64(state_to_json(state)),
                _BUNDLE_KEY: _b64(b"".join(state.bundle_pem())),
            },
        }

    async def _get(self) -> JsonObject | None:
        try:
            return await self._client.get_optional(SECRETS, self.namespace, self.name)
        except KubernetesError as e:
            raise CaSecretUnavailable(
                f"cannot read the CA Secret: {e.message}", hint=e.hint
            ) from None

    def load(self) -> CaState | None:
        secret = self._call(self._get())
        return None if secret is None else self._parse(secret)

    async def _update(self, change: Callable[[CaState | None], CaState]) -> CaState:
        for _attempt in range(8):
            secret = await self._get()
            if secret is None and not self._may_create():
                raise CaSecretUnavailable(
                    f"the CA Secret {self.namespace}/{self.name} does not exist yet and this "
                    "replica is not the leader",
                    hint="the leading controller creates it; this replica retries",
                )
            current = None if secret is None else self._parse(secret)
            new = change(current)
            rv = None if secret is None else str(secret["metadata"].get("resourceVersion") or "")
            try:
                if secret is None:
                    await self._client.create(SECRETS, self.namespace, self._body(new, None))
                else:
                    await self._client.replace(
                        SECRETS, self.namespace, self.name, self._body(new, rv)
                    )
            except KubernetesError as e:
                if e.conflict:
                    continue  # another replica wrote first: apply the change to its version
                raise CaSecretUnavailable(
                    f"cannot write the CA Secret: {e.message}", hint=e.hint
                ) from None
            self.writes += 1
            return new
        raise CaError(
            f"the CA Secret {self.namespace}/{self.name} kept changing while being updated",
            hint="retry; if it persists, check what else writes the Secret",
        )

    def update(self, change: Callable[[CaState | None], CaState]) -> CaState:
        return self._call(self._update(change))

    def exists(self) -> bool:
        return self._call(self._get()) is not None


@dataclass(frozen=True, slots=True)
class PluggedCa:
    """A user-supplied CA from the ``cacerts`` Secret."""

    resource_version: str
    cert_pem: bytes
    key_pem: bytes = b""
    chain_pem: bytes = b""  # the certificates above cert_pem up to the root; empty if self-signed


def _certs(data: bytes | None) -> list[x509.Certificate]:
    if not data:
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


async def read_plugged_ca(
    client: KubeClient, namespace: str = "veil-system", name: str = PLUGGED_CA_SECRET
) -> PluggedCa | None:
    """The plugged-in CA, or None when the Secret does not exist."""
    secret = await client.get_optional(SECRETS, namespace, name)
    if secret is None:
        return None
    where = f"Secret {namespace}/{name}"
    cert_pem = _secret_bytes(secret, "ca-cert.pem")
    key_pem = _secret_bytes(secret, "ca-key.pem")
    if not cert_pem or not key_pem:
        raise CaError(
            f"{where} needs ca-cert.pem and ca-key.pem",
            hint=f"create it with kubectl create secret generic {name} -n {namespace} "
            "--from-file=ca-cert.pem --from-file=ca-key.pem --from-file=root-cert.pem "
            "--from-file=cert-chain.pem",
        )
    signer = _certs(cert_pem)
    if not signer:
        raise CaError(f"{where}: ca-cert.pem holds no readable PEM certificate")
    # The chain above the signer: cert-chain.pem (Istio puts the signer first in it),
    # then root-cert.pem, without the signer itself and without repeats.
    seen = {_der(signer[0])}
    above: list[x509.Certificate] = []
    for cert in (
        signer[1:]
        + _certs(_secret_bytes(secret, "cert-chain.pem"))
        + _certs(_secret_bytes(secret, "root-cert.pem"))
    ):
        if _der(cert) not in seen:
            seen.add(_der(cert))
            above.append(cert)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in above)
    return PluggedCa(
        resource_version=str(secret.get("metadata", {}).get("resourceVersion") or ""),
        cert_pem=signer[0].public_bytes(serialization.Encoding.PEM),
        key_pem=key_pem,
        chain_pem=chain,
    )


@contextlib.contextmanager
def plugged_ca_files(ca: PluggedCa) -> Iterator[tuple[Path, Path, Path | None]]:
    """``(ca_cert, ca_key, ca_chain)`` paths for ``load_or_create``/``rotate``.

    The files exist only inside the ``with`` block, in a private directory (0700,
    files 0600), preferably on tmpfs (/dev/shm), and are removed on exit.
    """
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    directory = Path(tempfile.mkdtemp(prefix="veil-cacerts-", dir=base))
    try:

        def write(name: str, data: bytes) -> Path:
            path = directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return path

        cert = write("ca-cert.pem", ca.cert_pem)
        key = write("ca-key.pem", ca.key_pem)
        chain = write("cert-chain.pem", ca.chain_pem) if ca.chain_pem else None
        yield cert, key, chain
    finally:
        shutil.rmtree(directory, ignore_errors=True)
