"""Node enrollment: join with a token, renew the node certificate, request workload SVIDs.

Every function generates keys locally, sends only CSRs, and re-checks what comes
back (:func:`node.csr.check_issued_chain`) before storing or
returning it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.api.client import join_node
from controller.api.errors import ApiError
from controller.api.model import ResourceType
from controller.api.ports import CONTROLLER_JOIN_PORT, CONTROLLER_PORT
from controller.api.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, channel_identity
from controller.api.token import JoinToken
from node.errors import NodeCredentialsError

from .credentials import (
    NodeCredentials,
    load_node_credentials,
    save_node_credentials,
    save_trust_bundle,
)
from .csr import build_csr, check_issued_chain, generate_key, key_pem
from .pinning import (
    fetch_server_chain,
    format_host_port,
    select_pinned_root,
    split_host_port,
    trust_domain_hint,
)

__all__ = [
    "join",
    "mtls_address_of",
    "refresh_trust_bundle",
    "renew_node_certificate",
    "request_certificate",
]


def _fingerprints(pems: Sequence[bytes]) -> set[str]:
    out: set[str] = set()
    for block in pems:
        for cert in x509.load_pem_x509_certificates(block):
            out.add(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest())
    return out


async def join(
    controller_address: str,
    token: str,
    node: str,
    state_dir: Path,
    *,
    mtls_address: str | None = None,
    trust_domain: str | None = None,
    timeout: float = 10.0,
    ca_pem: bytes | None = None,
) -> NodeCredentials:
    """Joins the mesh as ``node`` and stores the credentials in ``state_dir``.

    ``controller_address`` is the join listener (``HOST[:15013]``). The main mTLS
    address is the one the controller reports in its answer (with the joined
    host when it listens on every address); ``mtls_address`` overrides it.

    Retries until ``timeout`` while the controller is unreachable or slow (it
    may still be starting); a refusal (bad token, wrong node) fails at once.

    With ``ca_pem`` (Kubernetes mode: the roots from the ``veil-ca-root``
    ConfigMap, and a ServiceAccount token instead of a join token) the CA is
    trusted as given and no fingerprint is pinned from the token.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.2
    while True:
        remaining = deadline - loop.time()
        try:
            return await _join_once(
                controller_address,
                token,
                node,
                state_dir,
                mtls_address=mtls_address,
                trust_domain=trust_domain,
                timeout=max(remaining, 0.1),
                ca_pem=ca_pem,
            )
        except (NodeCredentialsError, ApiError) as e:
            retryable = (
                isinstance(e, NodeCredentialsError)
                and e.message.startswith(("cannot reach", "TCP connect", "TLS handshake"))
            ) or (isinstance(e, ApiError) and e.code in _RETRYABLE)
            remaining = deadline - loop.time()
            if not retryable:
                raise
            if remaining <= delay:
                raise NodeCredentialsError(
                    f"could not join within --timeout {timeout:g}s: {e.message}",
                    hint=e.hint or "check the controller address, or raise --timeout",
                ) from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


def mtls_address_of(reported: str, joined_host: str) -> str:
    """The controller's reported mTLS address, with the joined host when it
    reports none or a wildcard (it listens on every address)."""
    if not reported:
        return format_host_port(joined_host, CONTROLLER_PORT)
    host, port = split_host_port(reported, CONTROLLER_PORT)
    if host in ("", "0.0.0.0", "::", "[::]", "*"):
        host = joined_host
    return format_host_port(host, port)


async def _join_once(
    controller_address: str,
    token: str,
    node: str,
    state_dir: Path,
    *,
    mtls_address: str | None,
    trust_domain: str | None,
    timeout: float,
    ca_pem: bytes | None,
) -> NodeCredentials:
    host, port = split_host_port(controller_address, CONTROLLER_JOIN_PORT)
    join_address = format_host_port(host, port)
    pinned: str | None = None
    if ca_pem is None:
        pinned = JoinToken.parse(token).ca_fingerprint
        chain = await fetch_server_chain(host, port, timeout)
        root_pem = select_pinned_root(chain, pinned)
        td = trust_domain or trust_domain_hint(chain) or DEFAULT_TRUST_DOMAIN
    else:
        root_pem = ca_pem
        td = trust_domain or DEFAULT_TRUST_DOMAIN
    expected = channel_identity(td, node)
    key = generate_key()
    result = await join_node(join_address, root_pem, token, node, build_csr(key, expected), timeout)
    if result.node != node or result.trust_domain != td:
        raise NodeCredentialsError(
            f"the controller answered for node {result.node!r} in trust domain "
            f"{result.trust_domain!r}; this node asked for {node!r} in {td!r}",
            hint="refusing the credentials; check the controller",
        )
    if pinned is not None and pinned not in _fingerprints(result.trust_bundle):
        raise NodeCredentialsError(
            "the trust bundle the controller sent does not contain the root pinned by the token",
            hint="refusing the credentials; create a new token and retry",
        )
    check_issued_chain(result.cert_chain, expected, key, result.trust_bundle)
    creds = NodeCredentials(
        node=node,
        trust_domain=td,
        controller_address=mtls_address or mtls_address_of(result.controller_address, host),
        join_address=join_address,
        key_pem=key_pem(key),
        cert_chain_pem=tuple(result.cert_chain),
        trust_bundle_pem=tuple(result.trust_bundle),
    )
    save_node_credentials(state_dir, creds)
    return creds


async def request_certificate(
    creds: NodeCredentials, identity: SpiffeId, ttl_seconds: int = 0, timeout: float = 10.0
) -> tuple[bytes, tuple[bytes, ...]]:
    """A fresh key and a certificate chain for ``identity``: (key PEM, chain PEMs leaf first).

    Raises ApiError with the controller's reason when it refuses.
    """
    key = generate_key()
    async with creds.client() as client:
        chain = await client.create_certificate(
            build_csr(key, identity), str(identity), ttl_seconds, timeout
        )
    check_issued_chain(chain, identity, key, creds.trust_bundle_pem)
    return key_pem(key), tuple(chain)


async def renew_node_certificate(state_dir: Path, timeout: float = 10.0) -> NodeCredentials:
    """Replaces the node key and certificate over mTLS with the current ones."""
    creds = load_node_credentials(state_dir)
    new_key, chain = await request_certificate(creds, creds.identity, 0, timeout)
    renewed = replace(creds, key_pem=new_key, cert_chain_pem=chain)
    save_node_credentials(state_dir, renewed)
    return renewed


async def refresh_trust_bundle(state_dir: Path, timeout: float = 10.0) -> NodeCredentials:
    """Fetches the current trust bundle from the Discovery stream and stores it.

    After a CA rotation the controller announces the new root on the stream;
    long-running components apply it as it comes, and this is the one-shot form
    for CLIs. It needs the controller's serving certificate to still chain to a
    root this node has, which holds until the old root is pruned.
    """
    creds = load_node_credentials(state_dir)

    async def first_bundle() -> tuple[bytes, ...]:
        async with creds.client() as client:
            stream = client.watch(creds.node, [ResourceType.NAMESPACE])
            try:
                async for update in stream:
                    if update.trust_bundle is not None:
                        return update.trust_bundle.roots
            finally:
                # An async generator: closing it cancels the RPC before the channel closes.
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
        raise NodeCredentialsError("the controller closed the stream without a trust bundle")

    try:
        roots = await asyncio.wait_for(first_bundle(), timeout)
    except TimeoutError:
        raise NodeCredentialsError(
            f"the controller sent no trust bundle within {timeout:g}s", hint="retry"
        ) from None
    if not roots or not _fingerprints(roots):
        raise NodeCredentialsError("the controller sent an empty trust bundle")
    save_trust_bundle(state_dir, roots)
    return replace(creds, trust_bundle_pem=roots)
