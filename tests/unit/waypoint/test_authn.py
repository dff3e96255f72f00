"""Table tests of JWT verification (waypoint.authn), keys generated here."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from controller.api.model import JwtHeader, JwtRule
from waypoint.authn import Authenticator, www_authenticate

ISS = "https://idp.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    pub = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        d = json.loads(RSAAlgorithm.to_jwk(pub))
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        d = json.loads(ECAlgorithm.to_jwk(pub))
    else:
        d = json.loads(OKPAlgorithm.to_jwk(pub))
    d["kid"] = kid
    return dict(d)


JWKS = json.dumps({"keys": [_jwk(RSA_KEY, "rsa"), _jwk(EC_KEY, "ec"), _jwk(ED_KEY, "ed")]})
RULE = JwtRule(issuer=ISS, audiences=("payments",), jwks=JWKS)
AUTH = Authenticator.compile([RULE])


def token(key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "sub": "alice", "aud": "payments", "iat": now, "exp": now + 600}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def bearer(t: str) -> dict[str, str]:
    return {"authorization": f"Bearer {t}"}


def no_uri(_uri: str) -> jwt.PyJWKSet | None:
    return None


@pytest.mark.parametrize(
    ("alg", "key", "kid"),
    [
        ("RS256", RSA_KEY, "rsa"),
        ("ES256", EC_KEY, "ec"),
        ("EdDSA", ED_KEY, "ed"),
        ("ES256", EC_KEY, None),
    ],
)
def test_valid_tokens(alg: str, key: Any, kid: str | None) -> None:
    r = AUTH.authenticate(bearer(token(key, alg, kid, role="admin")), no_uri)
    assert r.error is None
    assert r.principal == f"{ISS}/alice"
    assert r.claims is not None and r.claims["role"] == "admin"
    assert r.audiences == ("payments",)
    assert r.strip == ("authorization",)


# Headers are built when each test runs: a token minted at collection time
# would expire before a long suite reaches it.
@pytest.mark.parametrize(
    ("name", "make_headers", "fragment"),
    [
        ("expired", lambda: bearer(token(exp=int(time.time()) - 120)), "expired"),
        ("not yet valid", lambda: bearer(token(nbf=int(time.time()) + 300)), "not yet valid"),
        ("wrong audience", lambda: bearer(token(aud="billing")), "audience"),
        ("no audience", lambda: bearer(token(aud=None)), "aud"),
        ("unknown issuer", lambda: bearer(token(iss="https://evil")), "not accepted"),
        ("forged (other key, same kid)", lambda: bearer(token(OTHER_RSA)), "signature"),
        ("unknown kid", lambda: bearer(token(kid="nope")), "kid"),
        (
            "alg none",
            lambda: bearer(jwt.encode({"iss": ISS, "sub": "x"}, None, algorithm="none")),
            "algorithm",
        ),
        (
            "HS256",
            lambda: bearer(jwt.encode({"iss": ISS}, "k" * 32, algorithm="HS256")),
            "algorithm",
        ),
        ("garbage", lambda: bearer("not.a.jwt"), "malformed"),
        ("empty segments", lambda: bearer(".."), "malformed"),
        (
            "two different tokens",
            lambda: {"authorization": f"Bearer {token()}", "x-jwt": "y"},
            None,
        ),
    ],
)
def test_rejected_tokens(
    name: str, make_headers: Callable[[], dict[str, str]], fragment: str | None
) -> None:
    r = AUTH.authenticate(make_headers(), no_uri)
    if fragment is None:  # x-jwt is not a configured location: only one token found
        assert r.error is None
        return
    assert r.error is not None and fragment.lower() in r.error.lower(), r.error
    assert r.principal is None


def test_expiry_leeway() -> None:
    # Read the clock here, not at import: a long collection must not eat the leeway.
    now = int(time.time())
    assert AUTH.authenticate(bearer(token(exp=now - 10)), no_uri).error is None
    assert AUTH.authenticate(bearer(token(nbf=now + 10)), no_uri).error is None


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Basic dXNlcjpwdw=="}, {"authorization": "Bearer "}, {"x-other": "1"}],
)
def test_missing_token_is_anonymous_not_an_error(headers: dict[str, str]) -> None:
    r = AUTH.authenticate(headers, no_uri)
    assert (r.error, r.principal, r.claims) == (None, None, None)


def test_from_headers_and_forward() -> None:
    rule = JwtRule(
        issuer=ISS,
        jwks=JWKS,
        from_headers=(JwtHeader("X-Jwt", "Tok "),),
        forward_original_token=True,
    )
    auth = Authenticator.compile([rule])
    r = auth.authenticate({"x-jwt": f"Tok {token(aud='any')}"}, no_uri)
    assert r.error is None and r.strip == ()
    # No audiences configured: aud is not checked. The default header is not read.
    assert auth.authenticate(bearer(token()), no_uri).principal is None


def test_two_issuers() -> None:
    other = json.dumps({"keys": [_jwk(OTHER_RSA, "o")]})
    auth = Authenticator.compile([RULE, JwtRule(issuer="https://other", jwks=other)])
    r = auth.authenticate(bearer(token(OTHER_RSA, kid="o", iss="https://other", aud=None)), no_uri)
    assert r.principal == "https://other/alice"


def test_jwks_uri_keys_come_from_the_lookup() -> None:
    auth = Authenticator.compile([JwtRule(issuer=ISS, jwks_uri="http://127.0.0.1/jwks")])
    assert auth.jwks_uris == ("http://127.0.0.1/jwks",)
    assert "not fetched" in (auth.authenticate(bearer(token()), no_uri).error or "")
    keys = jwt.PyJWKSet.from_json(JWKS)
    assert auth.authenticate(bearer(token()), lambda uri: keys).error is None


@pytest.mark.parametrize(
    "bad", ["", "not json", '{"keys": 1}', '{"keys": []}', '{"keys": [{"kty": "x"}]}']
)
def test_bad_inline_jwks_fails_closed(bad: str) -> None:
    auth = Authenticator.compile([JwtRule(issuer=ISS, jwks=bad)])
    r = auth.authenticate(bearer(token()), no_uri)
    assert r.error is not None and r.principal is None


def test_www_authenticate() -> None:
    assert www_authenticate().startswith("Bearer ")


def test_verified_tokens_are_cached_until_expiry() -> None:
    auth = Authenticator.compile([RULE])
    now = time.time()
    t = token(exp=int(now) + 100)
    first = auth.authenticate(bearer(t), no_uri, now=now)
    assert first.error is None
    # The same token again: the cached result, the very same object.
    assert auth.authenticate(bearer(t), no_uri, now=now + 50) is first
    # Past exp + leeway the cache no longer answers: the token is verified again
    # (and PyJWT, on the real clock, still accepts it), never served stale.
    again = auth.authenticate(bearer(t), no_uri, now=now + 100 + 31)
    assert again is not first and again.principal == first.principal


def test_cache_follows_the_key_set_and_never_holds_failures() -> None:
    auth = Authenticator.compile([JwtRule(issuer=ISS, jwks_uri="http://127.0.0.1/jwks")])
    keys = jwt.PyJWKSet.from_json(JWKS)
    t = token()
    first = auth.authenticate(bearer(t), lambda uri: keys)
    assert first.error is None
    assert auth.authenticate(bearer(t), lambda uri: keys) is first
    # A refreshed JWKS without the signing key: the cached result is dropped.
    rotated = jwt.PyJWKSet.from_json(json.dumps({"keys": [_jwk(OTHER_RSA, "rsa")]}))
    assert auth.authenticate(bearer(t), lambda uri: rotated).error is not None
    # A forged token is refused every time.
    forged = token(OTHER_RSA)
    for _ in range(2):
        assert auth.authenticate(bearer(forged), lambda uri: keys).error is not None


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import waypoint.authn as authn

    monkeypatch.setattr(authn, "CACHE_SIZE", 3)
    auth = Authenticator.compile([RULE])
    for i in range(5):
        assert auth.authenticate(bearer(token(sub=f"u{i}")), no_uri).error is None
    assert len(auth._cache) == 3
