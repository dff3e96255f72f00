"""First-contact CA pinning for ``veil node join``.

A node that has only a join token does not yet trust any CA. Like kubeadm's
discovery hash, the token carries the SHA-256 of the controller's root. gRPC
cannot connect without verifying, so the node first does a plain TLS handshake
with verification off, only to read the chain the join listener presents (it
includes the root on purpose), picks the certificate whose SHA-256 equals the
token's fingerprint and from then on uses it as the only root: gRPC then
verifies the full chain and the ``veil-controller`` DNS SAN. Nothing read in the
unverified handshake is trusted except through that fingerprint match.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.api.client import CONTROLLER_SERVER_NAME
from controller.api.spiffe import InvalidSpiffeId, SpiffeId
from node.errors import NodeCredentialsError

__all__ = [
    "fetch_server_chain",
    "format_host_port",
    "select_pinned_root",
    "split_host_port",
    "trust_domain_hint",
]


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port)."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise NodeCredentialsError(f"cannot parse controller address {address!r}")
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
    else:
        host, port_text = address, ""
    if not host:
        raise NodeCredentialsError(
            f"controller address {address!r} has no host", hint="use HOST:PORT, e.g. 10.0.0.1:15013"
        )
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise NodeCredentialsError(
            f"controller address {address!r} has an invalid port", hint="use HOST:PORT"
        )
    return host, int(port_text)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def select_pinned_root(chain_der: Sequence[bytes], ca_fingerprint: str) -> bytes:
    """The PEM of the certificate whose SHA-256 is ``ca_fingerprint``, or NodeCredentialsError."""
    for der in chain_der:
        if hashlib.sha256(der).hexdigest() == ca_fingerprint.lower():
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                break
            return cert.public_bytes(serialization.Encoding.PEM)
    raise NodeCredentialsError(
        f"none of the {len(chain_der)} certificate(s) the controller presented matches the CA "
        f"fingerprint in the join token ({ca_fingerprint[:16]}...)",
        hint="check that --controller points at this cluster's join listener; if the CA was "
        "rotated after the token was created, create a new token",
    )


def trust_domain_hint(chain_der: Sequence[bytes]) -> str | None:
    """The trust domain named by the serving leaf's URI SAN ``spiffe://<td>/veil/controller``.

    Only a hint for building the node CSR: the controller checks it, and a wrong
    value just makes the join fail.
    """
    if not chain_der:
        return None
    try:
        leaf = x509.load_der_x509_certificate(chain_der[0])
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (
        ValueError,
        x509.ExtensionNotFound,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
        x509.InvalidVersion,
    ):
        # Unverified bytes from the network: anything unreadable is just "no hint".
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            return SpiffeId.parse(uri).trust_domain
        except InvalidSpiffeId:
            continue
    return None


def _unverified_chain(ssl_object: Any) -> list[bytes]:
    # Python 3.13 made this public (DER bytes); 3.10-3.12 have it on the inner
    # _ssl object, returning certificate objects. Both read the peer's chain as sent.
    public = getattr(ssl_object, "get_unverified_chain", None)
    if public is not None:
        return [bytes(c) for c in public() or []]
    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is None:
        raise NodeCredentialsError(
            "this Python cannot read a TLS peer's certificate chain",
            hint="use Python 3.10 or later",
        )
    import _ssl

    return [c.public_bytes(_ssl.ENCODING_DER) for c in getter() or []]


async def fetch_server_chain(host: str, port: int, timeout: float = 10.0) -> list[bytes]:
    """The DER certificates the TLS server at host:port presents, unverified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # read-only probe; trust comes from the fingerprint
    ctx.set_alpn_protocols(["h2"])
    where = format_host_port(host, port)
    hint = (
        "check --controller (the join listener, port 15013 by default) and that the "
        "controller is running"
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # TCP first, then TLS, each bounded, so a timeout says which step hung.
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        raise NodeCredentialsError(
            f"TCP connect to the controller join listener at {where} timed out after "
            f"{timeout:g}s (no answer: a firewall dropping packets, or no route)",
            hint=hint,
        ) from None
    except OSError as e:
        raise NodeCredentialsError(
            f"cannot reach the controller join listener at {where}: {e.strerror or e}", hint=hint
        ) from None
    try:
        await asyncio.wait_for(
            writer.start_tls(ctx, server_hostname=CONTROLLER_SERVER_NAME),
            max(deadline - loop.time(), 0.1),
        )
    except TimeoutError:
        writer.transport.abort()
        raise NodeCredentialsError(
            f"TLS handshake with the controller join listener at {where} timed out "
            "(the port accepts TCP but does not speak TLS: is it the join listener?)",
            hint=hint,
        ) from None
    except (OSError, ssl.SSLError) as e:
        writer.transport.abort()
        raise NodeCredentialsError(
            f"TLS handshake with the controller join listener at {where} failed: {e}", hint=hint
        ) from None
    try:
        return _unverified_chain(writer.get_extra_info("ssl_object"))
    finally:
        # Abort rather than close: a graceful TLS shutdown waits for the peer's
        # close_notify, which gRPC servers may never send (asyncio waits 30 s).
        writer.transport.abort()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
