"""SSL contexts for HBONE: TLS 1.3 only, ALPN ``h2``, mutual authentication.

This module owns turning a workload certificate plus a trust bundle into an
:class:`ssl.SSLContext`, and caching those contexts per identity:

* :func:`client_context` presents the source workload's SVID and verifies the
  server's chain against the bundle roots. :func:`server_context` presents the
  destination workload's SVID and *requires* a client chain to the bundle.
* OpenSSL checks the chain (``CERT_REQUIRED``, roots from ``cadata``, strict
  X.509). It cannot check SPIFFE URI SANs, so ``check_hostname`` is off and the
  caller runs :func:`ztunnel.tls.verify.verify_peer` right after the handshake.
* Private keys never touch a file system: cert and key are written to an
  anonymous ``memfd`` and loaded through ``/proc/self/fd/N``, then closed.
* :class:`TlsContextCache` keeps one context per (role, identity) and rebuilds it
  when the leaf certificate (rotation) or the bundle roots (CA roll-over) change.

Any object with the read-only attributes of :class:`WorkloadCredential` can be
used; ``ztunnel.identity.WorkloadCertificate`` is the one the ztunnel passes.
"""

from __future__ import annotations

import contextlib
import enum
import os
import ssl
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Protocol

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId

from .errors import CredentialError

__all__ = [
    "ALPN_H2",
    "Role",
    "TlsContextCache",
    "WorkloadCredential",
    "client_context",
    "server_context",
]

ALPN_H2 = "h2"


class WorkloadCredential(Protocol):
    """What this module reads from a workload certificate (leaf-first chain)."""

    @property
    def identity(self) -> SpiffeId: ...

    @property
    def key_pem(self) -> bytes: ...

    @property
    def chain_pem(self) -> tuple[bytes, ...]: ...

    @property
    def not_after(self) -> datetime: ...


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


def _bundle_cadata(bundle: TrustBundle) -> str:
    if not bundle.roots:
        raise CredentialError(
            f"the trust bundle for {bundle.trust_domain!r} holds no root certificate",
            hint="wait for the controller to send the trust bundle before serving HBONE",
        )
    try:
        return "\n".join(root.decode("ascii").strip() for root in bundle.roots) + "\n"
    except UnicodeDecodeError as exc:
        raise CredentialError(
            f"the trust bundle for {bundle.trust_domain!r} is not PEM text",
            hint="roots must be PEM encoded certificates",
        ) from exc


def _load_credential(ctx: ssl.SSLContext, cred: WorkloadCredential) -> None:
    """Load key and chain through an anonymous in-memory file; nothing reaches a disk."""
    if not cred.chain_pem:
        raise CredentialError(
            f"the certificate for {cred.identity} has an empty chain",
            hint="the chain must start with the workload's leaf certificate",
        )
    # OpenSSL reads the chain (leaf first) and then, in a second scan of the same
    # file, the key; each scan skips PEM blocks of the other kind.
    parts = [c.strip() for c in cred.chain_pem] + [cred.key_pem.strip()]
    data = b"\n".join(parts) + b"\n"
    fd = os.memfd_create("veil-svid", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        try:
            # password=b"x": an encrypted key fails instead of prompting on a TTY.
            ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=b"x")
        except (ssl.SSLError, OSError) as exc:
            raise CredentialError(
                f"cannot load the certificate and key for {cred.identity}: {exc}",
                hint="the key must be an unencrypted PEM key matching the chain's first "
                "(leaf) certificate",
            ) from exc
    finally:
        os.close(fd)


def _base_context(role: Role, bundle: TrustBundle) -> ssl.SSLContext:
    proto = ssl.PROTOCOL_TLS_SERVER if role is Role.SERVER else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(proto)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # SPIFFE identities live in URI SANs, which OpenSSL's hostname check ignores;
    # verify_peer() checks them after the handshake instead.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_alpn_protocols([ALPN_H2])
    if role is Role.SERVER:
        # No resumption: every connection presents and verifies a fresh chain.
        ctx.num_tickets = 0
    try:
        ctx.load_verify_locations(cadata=_bundle_cadata(bundle))
    except (ssl.SSLError, ValueError) as exc:
        raise CredentialError(
            f"cannot load the trust bundle for {bundle.trust_domain!r}: {exc}",
            hint="the bundle must hold PEM encoded CA certificates",
        ) from exc
    return ctx


def client_context(cred: WorkloadCredential, bundle: TrustBundle) -> ssl.SSLContext:
    """A client context presenting ``cred`` and verifying servers against ``bundle``."""
    ctx = _base_context(Role.CLIENT, bundle)
    _load_credential(ctx, cred)
    return ctx


def server_context(cred: WorkloadCredential, bundle: TrustBundle) -> ssl.SSLContext:
    """A server context presenting ``cred`` and requiring a client chain to ``bundle``."""
    ctx = _base_context(Role.SERVER, bundle)
    _load_credential(ctx, cred)
    return ctx


class TlsContextCache:
    """One SSL context per (role, identity), rebuilt when the certificate or roots change.

    Building a context costs a key parse and a bundle parse (about a millisecond),
    so it is done once per certificate, not once per connection. The cache is
    bounded (least recently used entries go first) and safe to share between
    threads.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[
            tuple[Role, SpiffeId], tuple[bytes, tuple[bytes, ...], ssl.SSLContext]
        ] = OrderedDict()

    def get(self, role: Role, cred: WorkloadCredential, bundle: TrustBundle) -> ssl.SSLContext:
        key = (role, cred.identity)
        leaf = cred.chain_pem[0] if cred.chain_pem else b""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == leaf and entry[1] == bundle.roots:
                self._entries.move_to_end(key)
                return entry[2]
        builder = server_context if role is Role.SERVER else client_context
        ctx = builder(cred, bundle)
        with self._lock:
            self._entries[key] = (leaf, bundle.roots, ctx)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return ctx

    def client(self, cred: WorkloadCredential, bundle: TrustBundle) -> ssl.SSLContext:
        return self.get(Role.CLIENT, cred, bundle)

    def server(self, cred: WorkloadCredential, bundle: TrustBundle) -> ssl.SSLContext:
        return self.get(Role.SERVER, cred, bundle)

    def forget(self, identity: SpiffeId) -> None:
        """Drop both contexts of ``identity`` (its workload left the node)."""
        with self._lock:
            for role in Role:
                with contextlib.suppress(KeyError):
                    del self._entries[(role, identity)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
