"""Workload certificates: the value the TLS layer uses, and how one is obtained.

The node generates an ECDSA P-256 key per request and sends a CSR whose only
subjectAltName is the workload's SPIFFE URI. It accepts the controller's
answer only after checking it itself (with the same node-side checks the node
certificate gets, :func:`node.csr.check_issued_chain`): the leaf
carries exactly that one URI SAN, certifies the key generated here, is not a
CA, is valid now, and chains to the trust bundle. The controller is trusted to
sign, not to decide which identity this node speaks as.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from node.csr import (
    build_csr,
    check_issued_chain,
    generate_key,
    key_pem,
    load_key,
    split_pem_chain,
)
from node.errors import NodeCredentialsError

from ..errors import CertificateError

__all__ = [
    "WorkloadCertificate",
    "build_csr",
    "chain_still_trusted",
    "generate_key",
    "key_pem",
    "verify_issued",
]


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    """A verified certificate and its private key for one workload identity.

    ``key_pem`` never leaves the node and never appears in ``repr`` or JSON.
    """

    identity: SpiffeId
    key_pem: bytes = field(repr=False)
    chain_pem: tuple[bytes, ...]  # PEM certificates, leaf first
    not_before: datetime
    not_after: datetime
    serial: int
    # When this node received it; see rotation_due.
    received_at: datetime | None = None

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    @property
    def rotation_due(self) -> datetime:
        """Half-life: renew when half the validity period has passed.

        The period starts at notBefore, or at reception when that is later:
        CAs backdate notBefore for clock skew (ours by a minute), which with a
        short lifetime would put the half-life in the past and make the node
        renew in a loop.
        """
        start = self.not_before
        if self.received_at is not None and self.received_at > start:
            start = self.received_at
        return start + (self.not_after - start) / 2

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after

    def to_json(self, now: datetime | None = None) -> dict[str, object]:
        out: dict[str, object] = {
            "identity": str(self.identity),
            "serial": self.serial_hex,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "rotation_due": self.rotation_due.isoformat(),
            "chain_length": len(self.chain_pem),
        }
        if now is not None:
            out["expires_in_seconds"] = round((self.not_after - now).total_seconds(), 3)
        return out


def verify_issued(
    chain_pem: Sequence[bytes],
    identity: SpiffeId,
    key: ec.EllipticCurvePrivateKey,
    trust_bundle: TrustBundle,
    now: datetime,
) -> WorkloadCertificate:
    """Checks the controller's answer and returns the certificate to use.

    Raises :class:`~ztunnel.errors.CertificateError` naming what is wrong.
    """
    try:
        leaf = check_issued_chain(chain_pem, identity, key, trust_bundle.roots, now)
    except NodeCredentialsError as e:
        raise CertificateError(e.message, hint=e.hint) from None
    chain = tuple(c.public_bytes(serialization.Encoding.PEM) for c in split_pem_chain(chain_pem))
    return WorkloadCertificate(
        identity=identity,
        key_pem=key_pem(key),
        chain_pem=chain,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
        received_at=now,
    )


def chain_still_trusted(
    cert: WorkloadCertificate, trust_bundle: TrustBundle, now: datetime
) -> bool:
    """Does a held certificate still pass every check against a (rotated) trust bundle?"""
    try:
        check_issued_chain(
            cert.chain_pem,
            cert.identity,
            load_key(cert.key_pem, "held key"),
            trust_bundle.roots,
            now,
        )
    except NodeCredentialsError:
        return False
    return True
