"""The join token format (pure; no I/O).

``veil1.<id>.<secret>.<ca-sha256>``:

* ``id``: 12 lowercase hex characters, names the token in listings and logs;
* ``secret``: 32 base64url characters (192 random bits); only its SHA-256 is stored;
* ``ca-sha256``: the SHA-256 of the controller root's DER, 64 lowercase hex. The
  node pins the CA with it on first contact, as kubeadm's discovery hash does.

The node name is bound to the token on the controller side, not in the string.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass

from veil.errors import VeilError

__all__ = ["TOKEN_PREFIX", "JoinToken", "TokenError"]

TOKEN_PREFIX = "veil1"
_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{32}$")
_FP_RE = re.compile(r"^[0-9a-f]{64}$")


class TokenError(VeilError):
    """A join token could not be created, parsed or stored."""


_FORMAT = f"{TOKEN_PREFIX}.<12 hex id>.<32 base64url secret>.<64 hex CA sha256>"


@dataclass(frozen=True, slots=True)
class JoinToken:
    token_id: str
    secret: str
    ca_fingerprint: str

    @classmethod
    def generate(cls, ca_fingerprint: str) -> JoinToken:
        if not _FP_RE.match(ca_fingerprint):
            raise TokenError(
                f"CA fingerprint {ca_fingerprint!r} is not 64 lowercase hex characters"
            )
        secret = base64.urlsafe_b64encode(secrets.token_bytes(24)).decode()
        return cls(secrets.token_hex(6), secret, ca_fingerprint)

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        parts = text.strip().split(".")
        if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
            raise TokenError(
                f"join token is malformed: expected {_FORMAT}",
                hint="copy the whole token printed by `veil controller token create`",
            )
        _, token_id, secret, fp = parts
        if not (_ID_RE.match(token_id) and _SECRET_RE.match(secret) and _FP_RE.match(fp)):
            raise TokenError(
                f"join token is malformed: expected {_FORMAT}",
                hint="copy the whole token printed by `veil controller token create`",
            )
        return cls(token_id, secret, fp)

    @property
    def secret_hash(self) -> str:
        """What is stored at rest: the SHA-256 of the secret (192 random bits need no KDF)."""
        return hashlib.sha256(self.secret.encode()).hexdigest()

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.token_id}.{self.secret}.{self.ca_fingerprint}"

    def __repr__(self) -> str:
        # Never print the secret by accident (logs, tracebacks).
        return f"JoinToken(id={self.token_id}, ca={self.ca_fingerprint[:16]}...)"
