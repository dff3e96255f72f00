"""A node's credentials in its state directory, and the mTLS client built from them.

Layout of ``<state-dir>``:

* ``node.json``: node name, trust domain, controller addresses (main mTLS and join);
* ``node-key.pem`` (0600): the node's private key, generated here, never sent;
* ``node-cert.pem``: the node certificate chain, leaf first;
* ``bundle.pem``: the trust bundle (every root the controller currently trusts).

``veil node join`` writes them; the agent, the ztunnel and ``veil node
certificate`` read them with :func:`load_node_credentials`. Writers and readers
hold ``.node.lock`` so a renewal never shows a key with the wrong certificate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.api.client import ControllerClient
from controller.api.model import TrustBundle
from controller.api.spiffe import InvalidSpiffeId, SpiffeId, channel_identity
from node.errors import NodeCredentialsError
from veil.files import atomic_write, ensure_private_dir, exclusive_lock

from .csr import load_key, split_pem_chain

__all__ = [
    "NodeCredentials",
    "load_node_credentials",
    "save_node_credentials",
    "save_trust_bundle",
]

_META = "node.json"
_KEY = "node-key.pem"
_CERT = "node-cert.pem"
_BUNDLE = "bundle.pem"
_LOCK = ".node.lock"
_HINT_JOIN = (
    "join first: veil node join --controller HOST:15013 --token TOKEN --node NAME --state-dir DIR"
)


@dataclass(frozen=True, slots=True)
class NodeCredentials:
    node: str
    trust_domain: str
    controller_address: str  # main listener, mutual TLS (HOST:15012)
    join_address: str  # join listener (HOST:15013)
    key_pem: bytes
    cert_chain_pem: tuple[bytes, ...]  # leaf first
    trust_bundle_pem: tuple[bytes, ...]  # PEM roots

    @property
    def identity(self) -> SpiffeId:
        return channel_identity(self.trust_domain, self.node)

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_chain_pem[0])

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def trust_bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, self.trust_bundle_pem)

    def client(self) -> ControllerClient:
        """An mTLS channel to the controller's main listener as this node."""
        return ControllerClient(
            self.controller_address,
            key_pem=self.key_pem,
            cert_chain_pem=b"".join(self.cert_chain_pem),
            trust_bundle_pem=b"".join(self.trust_bundle_pem),
        )


def _pem_blocks(data: bytes) -> tuple[bytes, ...]:
    """Splits concatenated PEM certificates into one bytes object per certificate."""
    return tuple(c.public_bytes(serialization.Encoding.PEM) for c in split_pem_chain([data]))


def save_node_credentials(state_dir: Path, creds: NodeCredentials) -> None:
    state_dir = ensure_private_dir(Path(state_dir))
    meta = {
        "version": 1,
        "node": creds.node,
        "trust_domain": creds.trust_domain,
        "controller": creds.controller_address,
        "join_controller": creds.join_address,
    }
    try:
        with exclusive_lock(state_dir / _LOCK):
            atomic_write(state_dir / _KEY, creds.key_pem, 0o600)
            atomic_write(state_dir / _CERT, b"".join(creds.cert_chain_pem), 0o644)
            atomic_write(state_dir / _BUNDLE, b"".join(creds.trust_bundle_pem), 0o644)
            atomic_write(state_dir / _META, (json.dumps(meta, indent=2) + "\n").encode(), 0o644)
    except OSError as e:
        raise NodeCredentialsError(
            f"cannot write node credentials to {state_dir}: {e.strerror}",
            hint="check that the state directory is writable by this user",
        ) from None


def save_trust_bundle(state_dir: Path, roots: tuple[bytes, ...]) -> None:
    """Replaces the stored trust bundle (e.g. after the controller announced a new root)."""
    if not roots:
        raise NodeCredentialsError("refusing to store an empty trust bundle")
    with exclusive_lock(Path(state_dir) / _LOCK):
        atomic_write(Path(state_dir) / _BUNDLE, b"".join(roots), 0o644)


def load_node_credentials(state_dir: Path) -> NodeCredentials:
    """Reads and checks the credentials ``veil node join`` stored in ``state_dir``."""
    state_dir = Path(state_dir)
    if not (state_dir / _META).exists():
        raise NodeCredentialsError(f"no node credentials in {state_dir}", hint=_HINT_JOIN)
    try:
        with exclusive_lock(state_dir / _LOCK):
            meta = json.loads((state_dir / _META).read_bytes())
            key_pem = (state_dir / _KEY).read_bytes()
            chain = _pem_blocks((state_dir / _CERT).read_bytes())
            bundle = _pem_blocks((state_dir / _BUNDLE).read_bytes())
    except OSError as e:
        raise NodeCredentialsError(
            f"cannot read node credentials in {state_dir}: {e.strerror} ({e.filename})",
            hint=_HINT_JOIN,
        ) from None
    except ValueError as e:
        raise NodeCredentialsError(
            f"{state_dir / _META} is not valid JSON: {e}", hint=_HINT_JOIN
        ) from None
    try:
        creds = NodeCredentials(
            node=str(meta["node"]),
            trust_domain=str(meta["trust_domain"]),
            controller_address=str(meta["controller"]),
            join_address=str(meta.get("join_controller", "")),
            key_pem=key_pem,
            cert_chain_pem=chain,
            trust_bundle_pem=bundle,
        )
        creds.identity  # noqa: B018 - validates node name and trust domain
    except (KeyError, TypeError, InvalidSpiffeId) as e:
        raise NodeCredentialsError(
            f"{state_dir / _META} is incomplete or invalid: {e}", hint=_HINT_JOIN
        ) from None
    if not chain or not bundle:
        raise NodeCredentialsError(
            f"node certificate or trust bundle missing in {state_dir}", hint=_HINT_JOIN
        )
    key = load_key(key_pem, str(state_dir / _KEY))
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if creds.leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise NodeCredentialsError(
            f"{state_dir / _KEY} does not match {state_dir / _CERT}", hint=_HINT_JOIN
        )
    return creds
