"""Validation of certificate signing requests sent by nodes (pure; no I/O).

A CSR is accepted only when it proves possession of an ECDSA P-256 key (valid
self-signature) and asks for exactly one name: the URI SAN equal, as a string,
to the identity the caller requested. Every refusal is an
:class:`~controller.api.errors.ApiError` with ``INVALID_ARGUMENT`` and a message
saying what was wrong and what is expected, which the node prints verbatim.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from controller.api.errors import ApiError
from controller.api.spiffe import InvalidSpiffeId, SpiffeId

__all__ = ["MAX_CSR_BYTES", "validate_csr"]

# A P-256 CSR with one SAN is well under 1 KiB; the cap stops parsing of junk.
MAX_CSR_BYTES = 16 * 1024


def _bad(message: str, hint: str | None = None) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message, hint=hint)


def validate_csr(csr_pem: bytes, expected: SpiffeId) -> ec.EllipticCurvePublicKey:
    """Checks ``csr_pem`` against ``expected``; returns the key to certify."""
    if not csr_pem:
        raise _bad("the request carries no CSR", hint="send a PEM PKCS#10 CSR in the csr field")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise _bad(f"CSR is {len(csr_pem)} bytes; the limit is {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, x509.InvalidVersion) as e:
        raise _bad(f"CSR is not a PEM-encoded PKCS#10 request: {e}") from None
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise _bad(f"CSR public key cannot be read: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        what = type(key).__name__.removeprefix("_").replace("PublicKey", "")
        if isinstance(key, ec.EllipticCurvePublicKey):
            what = f"EC {key.curve.name}"
        raise _bad(
            f"CSR key is {what}; an ECDSA P-256 (secp256r1) key is required",
            hint="generate the workload key with ECDSA P-256",
        )
    try:
        signature_ok = csr.is_signature_valid
    except Exception as e:  # cryptography raises several types for malformed signatures
        raise _bad(f"CSR signature cannot be checked: {e}") from None
    if not signature_ok:
        raise _bad(
            "CSR signature does not verify with its public key",
            hint="the CSR was altered after signing or signed with another key; build it again",
        )
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise _bad(
            f"CSR has no subjectAltName; exactly one URI SAN {expected} is required"
        ) from None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise _bad(f"CSR extensions cannot be parsed: {e}") from None
    names = list(san)
    if len(names) != 1:
        raise _bad(
            f"CSR has {len(names)} subjectAltNames; exactly one URI SAN {expected} is required"
        )
    name = names[0]
    if not isinstance(name, x509.UniformResourceIdentifier):
        raise _bad(
            f"CSR subjectAltName is a {type(name).__name__}; exactly one URI SAN {expected} "
            "is required"
        )
    try:
        requested = SpiffeId.parse(name.value)
    except InvalidSpiffeId as e:
        raise _bad(f"CSR URI SAN is not a valid SPIFFE ID: {e}") from None
    # Literal comparison, never pattern matching: the SAN is the identity.
    if name.value != str(expected):
        raise _bad(
            f"CSR URI SAN {requested} differs from the requested identity {expected}",
            hint="put the requested SPIFFE ID in the CSR's URI SAN",
        )
    return key
