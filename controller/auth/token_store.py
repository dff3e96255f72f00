"""Join tokens at rest: creation, listing, revocation and single-use verification.

``<state-dir>/join-tokens.json`` (0600) maps token ids to the node they are bound
to, their expiry, the CA fingerprint they carry and the SHA-256 of their secret;
the secret itself is never stored. The ``veil controller token`` CLI and the
running controller share the file, so every read-modify-write holds an
``flock`` on ``<state-dir>/.join-tokens.lock``; "verify and mark used" is one
such transaction, which makes a token single-use even across processes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from controller.api.errors import ApiError
from controller.api.spiffe import DEFAULT_TRUST_DOMAIN, InvalidSpiffeId, node_identity
from controller.api.token import JoinToken
from controller.ca.authority import Clock, utc_now
from controller.errors import TokenError
from veil.files import atomic_write, exclusive_lock

__all__ = ["DEFAULT_TOKEN_TTL", "MAX_TOKEN_TTL", "JoinTokenStore", "TokenInfo"]

log = logging.getLogger("veil.controller.auth")

DEFAULT_TOKEN_TTL = timedelta(hours=1)
MAX_TOKEN_TTL = timedelta(days=30)
# Spent and expired tokens stay listed this long, so a late join gets
# "expired"/"already used" rather than "not recognised".
_KEEP_SPENT = timedelta(days=1)
_HINT_NEW = "create a new token with `veil controller token create --node NAME`"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    token_id: str
    node: str
    created: datetime
    expires: datetime
    used_at: datetime | None
    ca_fingerprint: str

    def state(self, now: datetime) -> str:
        if self.used_at is not None:
            return "used"
        return "expired" if now >= self.expires else "valid"


def _unauth(message: str, hint: str = _HINT_NEW) -> ApiError:
    return ApiError("UNAUTHENTICATED", message, hint=hint)


class JoinTokenStore:
    """Implements :class:`controller.auth.NodeAuthenticator` with single-use join tokens."""

    def __init__(
        self,
        state_dir: Path,
        *,
        ca_fingerprint: Callable[[], str] | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.path = Path(state_dir) / "join-tokens.json"
        self._lock_path = Path(state_dir) / ".join-tokens.lock"
        self._ca_fingerprint = ca_fingerprint
        self._clock = clock

    # ----- file format -----------------------------------------------------

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise TokenError(f"cannot read {self.path}: {e.strerror}") from None
        except ValueError as e:
            raise TokenError(
                f"{self.path} is not valid JSON ({e})",
                hint="delete the file to invalidate every outstanding join token",
            ) from None
        tokens = doc.get("tokens") if isinstance(doc, dict) else None
        if not isinstance(tokens, dict):
            raise TokenError(
                f"{self.path} is not a Veil join token file",
                hint="delete the file to invalidate every outstanding join token",
            )
        return tokens

    def _write(self, tokens: dict[str, dict[str, Any]]) -> None:
        now = self._clock()
        kept = {}
        for token_id, entry in tokens.items():
            spent_at = entry.get("used_at") or entry["expires"]
            if datetime.fromisoformat(spent_at) + _KEEP_SPENT > now:
                kept[token_id] = entry
        data = json.dumps({"version": 1, "tokens": kept}, indent=2, sort_keys=True) + "\n"
        atomic_write(self.path, data.encode(), 0o600)

    @staticmethod
    def _info(token_id: str, entry: dict[str, Any]) -> TokenInfo:
        return TokenInfo(
            token_id=token_id,
            node=str(entry["node"]),
            created=datetime.fromisoformat(entry["created"]),
            expires=datetime.fromisoformat(entry["expires"]),
            used_at=datetime.fromisoformat(entry["used_at"]) if entry.get("used_at") else None,
            ca_fingerprint=str(entry["ca_sha256"]),
        )

    # ----- operator operations --------------------------------------------

    def create(
        self, node: str, ttl: timedelta = DEFAULT_TOKEN_TTL, *, ca_fingerprint: str | None = None
    ) -> str:
        """Creates a single-use token bound to ``node``; returns the token string."""
        try:
            node_identity(DEFAULT_TRUST_DOMAIN, node)
        except InvalidSpiffeId as e:
            raise TokenError(f"cannot create a join token: {e.message}", hint=e.hint) from None
        if ttl <= timedelta(0) or ttl > MAX_TOKEN_TTL:
            raise TokenError(
                f"join token lifetime {ttl} is out of range",
                hint=f"use a positive --ttl of at most {MAX_TOKEN_TTL.days} days, e.g. 1h",
            )
        fp = ca_fingerprint or (self._ca_fingerprint() if self._ca_fingerprint else None)
        if fp is None:
            raise TokenError("cannot create a join token without the CA fingerprint")
        token = JoinToken.generate(fp)
        now = self._clock()
        with exclusive_lock(self._lock_path):
            tokens = self._read()
            tokens[token.token_id] = {
                "node": node,
                "created": now.isoformat(),
                "expires": (now + ttl).isoformat(),
                "secret_sha256": token.secret_hash,
                "ca_sha256": fp,
                "used_at": None,
            }
            self._write(tokens)
        log.info(
            "created join token %s for node %s, valid until %s", token.token_id, node, now + ttl
        )
        return str(token)

    def list(self) -> tuple[TokenInfo, ...]:
        tokens = self._read()
        return tuple(sorted((self._info(k, v) for k, v in tokens.items()), key=lambda t: t.created))

    def revoke(self, token_id: str) -> bool:
        """Deletes a token; True when it existed."""
        with exclusive_lock(self._lock_path):
            tokens = self._read()
            existed = tokens.pop(token_id, None) is not None
            if existed:
                self._write(tokens)
        return existed

    # ----- NodeAuthenticator ---------------------------------------------

    def verify_and_consume(self, token: str, claimed_node: str) -> str:
        """Checks the token and marks it used, atomically; returns the bound node name."""
        try:
            parsed = JoinToken.parse(token)
        except TokenError as e:
            raise _unauth(e.message, hint=e.hint or _HINT_NEW) from None
        now = self._clock()
        with exclusive_lock(self._lock_path):
            tokens = self._read()
            entry = tokens.get(parsed.token_id)
            if entry is None:
                raise _unauth(f"join token {parsed.token_id} is not recognised")
            # Token ids are not secret (they are listed and logged); saying the
            # secret is wrong tells an operator they mistyped, and still reveals
            # nothing about the secret itself (compared in constant time).
            if not hmac.compare_digest(str(entry.get("secret_sha256", "")), parsed.secret_hash):
                raise _unauth(
                    f"invalid secret for join token {parsed.token_id}",
                    hint="copy the whole token printed by `veil controller token create`, "
                    "or create a new one",
                )
            info = self._info(parsed.token_id, entry)
            if info.ca_fingerprint != parsed.ca_fingerprint:
                raise _unauth(
                    f"join token {parsed.token_id} carries a CA fingerprint it was not issued with"
                )
            if info.used_at is not None:
                raise _unauth(
                    f"join token {parsed.token_id} was already used at {info.used_at.isoformat()}; "
                    "tokens are single-use"
                )
            if now >= info.expires:
                raise _unauth(f"join token {parsed.token_id} expired at {info.expires.isoformat()}")
            if claimed_node != info.node:
                raise _unauth(
                    f"join token {parsed.token_id} was issued for node {info.node!r}, "
                    f"not {claimed_node!r}",
                    hint=f"join with --node {info.node}, or create a token for {claimed_node!r}",
                )
            entry["used_at"] = now.isoformat()
            self._write(tokens)
        log.info("join token %s used by node %s", parsed.token_id, info.node)
        return info.node

    async def authenticate(self, token: str, claimed_node: str) -> str:
        try:
            return await asyncio.to_thread(self.verify_and_consume, token, claimed_node)
        except TokenError as e:
            # The token file itself is broken: the caller is not at fault, but fail closed.
            log.error("join token store: %s", e)
            raise ApiError(
                "UNAVAILABLE",
                "the controller cannot read its join tokens",
                hint="see controller log",
            ) from None
