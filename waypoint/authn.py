"""RequestAuthentication: find, verify and account for a request's JWT.

An :class:`Authenticator` holds the compiled ``jwtRules`` that apply to one
destination (built once per state change, never per request). For each
request :meth:`Authenticator.authenticate` looks for tokens in the rules'
locations (default ``Authorization: Bearer <token>``) and returns an
:class:`AuthnResult`:

- no token anywhere: no request principal, not an error (a policy decides
  whether anonymous requests pass);
- a token that verifies: request principal ``<iss>/<sub>``, its claims and
  audiences, and the headers to strip before forwarding (the token's header,
  unless the rule says ``forwardOriginalToken``);
- anything else (bad signature, unknown key or issuer, wrong audience,
  expired, not yet valid, unsupported algorithm, garbage): ``error`` set, and
  the waypoint answers 401 with ``WWW-Authenticate``.

Verified tokens are cached per :class:`Authenticator` (so a policy change
starts afresh) by the SHA-256 of the token, bounded to :data:`CACHE_SIZE`
entries, until the token's ``exp`` (plus leeway, at most :data:`CACHE_TTL`)
and only while its issuer's key set is the same object it was verified with:
a JWKS refresh or rotation invalidates it. Clients reuse one token across
thousands of requests, and a signature check costs more than the rest of
the request's decision. Failures are never cached.

Signatures: RS256, ES256 and EdDSA (PyJWT on ``cryptography``); ``exp`` and
``nbf`` are checked with :data:`LEEWAY` seconds of clock skew. Keys come
from the inline ``jwks`` or, for ``jwksUri``, from a ``keys_for(uri)`` lookup
(:class:`waypoint.jwks.JwksCache`) so this module does no IO.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt

from controller.api.model import JwtHeader, JwtRule

__all__ = [
    "ALGORITHMS",
    "LEEWAY",
    "Authenticator",
    "AuthnResult",
    "JwtProvider",
    "KeysFor",
    "compile_provider",
    "parse_jwks",
    "www_authenticate",
]

log = logging.getLogger("veil.waypoint.authn")

ALGORITHMS = ("RS256", "ES256", "EdDSA")
LEEWAY = 30.0
MAX_TOKEN = 16 * 1024
CACHE_SIZE = 1024
CACHE_TTL = 300.0
DEFAULT_HEADER = JwtHeader("authorization", "Bearer ")
_NO_CLAIMS: Mapping[str, object] = MappingProxyType({})

KeysFor = Callable[[str], "jwt.PyJWKSet | None"]


def parse_jwks(text: str) -> jwt.PyJWKSet:
    """A JWKS document (JSON text) as a key set; raises ValueError saying why not."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"JWKS is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('JWKS must be an object with a "keys" list')
    try:
        return jwt.PyJWKSet.from_dict(data)
    except jwt.PyJWTError as e:
        raise ValueError(f"JWKS has no usable key: {e}") from None


@dataclass(frozen=True, slots=True)
class JwtProvider:
    """One compiled ``jwtRules`` entry."""

    issuer: str
    audiences: tuple[str, ...]
    locations: tuple[JwtHeader, ...]  # lower-case header names
    forward: bool
    keys: jwt.PyJWKSet | None = None  # inline JWKS
    jwks_uri: str = ""
    invalid: str | None = None  # why the rule cannot verify anything (fail closed)


def compile_provider(rule: JwtRule) -> JwtProvider:
    locations = tuple(
        JwtHeader(h.name.strip().lower(), h.prefix) for h in rule.from_headers if h.name.strip()
    ) or (DEFAULT_HEADER,)
    keys: jwt.PyJWKSet | None = None
    invalid: str | None = None
    if rule.jwks:
        try:
            keys = parse_jwks(rule.jwks)
        except ValueError as e:
            invalid = f"inline jwks of issuer {rule.issuer}: {e}"
    elif not rule.jwks_uri:
        invalid = f"issuer {rule.issuer} has neither jwks nor jwksUri"
    return JwtProvider(
        issuer=rule.issuer,
        audiences=rule.audiences,
        locations=locations,
        forward=rule.forward_original_token,
        keys=keys,
        jwks_uri=rule.jwks_uri if not rule.jwks else "",
        invalid=invalid,
    )


@dataclass(frozen=True, slots=True)
class AuthnResult:
    principal: str | None = None  # "<iss>/<sub>"
    claims: Mapping[str, object] | None = None
    audiences: tuple[str, ...] = ()
    presenter: str | None = None
    error: str | None = None  # set: answer 401
    strip: tuple[str, ...] = ()  # lower-case header names to remove before forwarding
    issuer: str | None = None


def www_authenticate(error: str | None = None) -> str:
    """The ``WWW-Authenticate`` value of a 401 (RFC 6750)."""
    return 'Bearer realm="veil", error="invalid_token"'


def _extract(value: str, prefix: str) -> str | None:
    if not prefix:
        return value.strip() or None
    if len(value) >= len(prefix) and value[: len(prefix)].lower() == prefix.lower():
        return value[len(prefix) :].strip() or None
    return None


def _audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


class Authenticator:
    """The JWT rules of one destination; pure given ``keys_for``."""

    def __init__(self, providers: Iterable[JwtProvider]) -> None:
        self.providers = tuple(providers)
        # (header, sha256(token)) -> (result, provider, key set, valid from, valid until)
        self._cache: dict[
            tuple[JwtHeader, bytes],
            tuple[AuthnResult, JwtProvider, jwt.PyJWKSet, float, float],
        ] = {}
        seen: dict[tuple[str, str], JwtHeader] = {}
        for p in self.providers:
            for loc in p.locations:
                seen.setdefault((loc.name, loc.prefix), loc)
        self._locations = tuple(seen.values())

    @classmethod
    def compile(cls, rules: Iterable[JwtRule]) -> Authenticator:
        return cls(compile_provider(r) for r in rules)

    def __bool__(self) -> bool:
        return bool(self.providers)

    @property
    def jwks_uris(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.jwks_uri for p in self.providers if p.jwks_uri))

    def authenticate(
        self, headers: Mapping[str, str], keys_for: KeysFor, now: float | None = None
    ) -> AuthnResult:
        """Finds and verifies the request's token (``headers``: lower-case names)."""
        if not self.providers:
            return AuthnResult()
        found: list[tuple[JwtHeader, str]] = []
        for loc in self._locations:
            value = headers.get(loc.name)
            if value is None:
                continue
            token = _extract(value, loc.prefix)
            if token is not None:
                found.append((loc, token))
        if not found:
            return AuthnResult()
        loc, token = found[0]
        if any(t != token for _, t in found[1:]):
            return AuthnResult(error="the request carries more than one JWT")
        return self._verify(loc, token, keys_for, now)

    def _verify(
        self, loc: JwtHeader, token: str, keys_for: KeysFor, now: float | None
    ) -> AuthnResult:
        if len(token) > MAX_TOKEN:
            return AuthnResult(error=f"JWT longer than {MAX_TOKEN} bytes")
        at = time.time() if now is None else now
        cache_key = (loc, hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest())
        hit = self._cache.get(cache_key)
        if hit is not None:
            cached, provider, keys, valid_from, valid_until = hit
            current = provider.keys if provider.keys is not None else keys_for(provider.jwks_uri)
            if current is keys and valid_from <= at < valid_until:
                return cached
            del self._cache[cache_key]
        return self._verify_uncached(loc, token, keys_for, cache_key, at)

    def _remember(
        self,
        cache_key: tuple[JwtHeader, bytes],
        result: AuthnResult,
        provider: JwtProvider,
        keys: jwt.PyJWKSet,
        at: float,
    ) -> None:
        claims = result.claims or _NO_CLAIMS
        exp, nbf = claims.get("exp"), claims.get("nbf")
        until = at + CACHE_TTL
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            until = min(until, float(exp) + LEEWAY)
        since = float("-inf")
        if isinstance(nbf, (int, float)) and not isinstance(nbf, bool):
            since = float(nbf) - LEEWAY
        if len(self._cache) >= CACHE_SIZE:
            # Evict the oldest entry (dicts keep insertion order).
            self._cache.pop(next(iter(self._cache)))
        if since < until:
            self._cache[cache_key] = (result, provider, keys, since, until)

    def _verify_uncached(
        self,
        loc: JwtHeader,
        token: str,
        keys_for: KeysFor,
        cache_key: tuple[JwtHeader, bytes],
        at: float,
    ) -> AuthnResult:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            return AuthnResult(error=f"malformed JWT: {e}")
        iss = unverified.get("iss")
        alg = header.get("alg")
        if not isinstance(iss, str):
            return AuthnResult(error="JWT has no issuer (iss)")
        provider = next((p for p in self.providers if p.issuer == iss and loc in p.locations), None)
        if provider is None:
            return AuthnResult(error=f"JWT issuer {iss!r} is not accepted here")
        if alg not in ALGORITHMS:
            return AuthnResult(
                error=f"JWT algorithm {alg!r} is not accepted ({', '.join(ALGORITHMS)})"
            )
        if provider.invalid is not None:
            return AuthnResult(error=f"cannot verify: {provider.invalid}")
        keys = provider.keys if provider.keys is not None else keys_for(provider.jwks_uri)
        if keys is None:
            return AuthnResult(error=f"no signing keys for issuer {iss} (jwksUri not fetched)")
        candidates = _candidates(keys, header.get("kid"), alg)
        if not candidates:
            return AuthnResult(error=f"no key of issuer {iss} matches kid {header.get('kid')!r}")
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key=key,
                    algorithms=[alg],
                    issuer=provider.issuer,
                    audience=provider.audiences or None,
                    leeway=LEEWAY,
                    options={"verify_aud": bool(provider.audiences)},
                )
            except jwt.InvalidSignatureError:
                continue
            except (jwt.PyJWTError, ValueError, TypeError) as e:
                return AuthnResult(error=f"JWT rejected: {e}")
            sub = claims.get("sub")
            azp = claims.get("azp")
            result = AuthnResult(
                principal=f"{iss}/{sub if isinstance(sub, str) else ''}",
                claims=MappingProxyType(dict(claims)),
                audiences=_audiences(claims),
                presenter=azp if isinstance(azp, str) else None,
                strip=() if provider.forward else (loc.name,),
                issuer=iss,
            )
            self._remember(cache_key, result, provider, keys, at)
            return result
        return AuthnResult(error="JWT rejected: signature verification failed")


def _candidates(keys: jwt.PyJWKSet, kid: object, alg: str) -> list[jwt.PyJWK]:
    """The keys that may have signed a token: its ``kid`` (when it names one) and
    made for its algorithm (a key never verifies under another algorithm)."""
    return [k for k in keys.keys if (kid is None or k.key_id == kid) and k.algorithm_name == alg]
