"""L7 policy fields and RequestAuthentication specs: validation into model values.

The waypoint enforces what the ztunnels cannot see: HTTP methods, paths and
hosts (``to[].operation``), JWT request principals (``from[].source``),
``when`` conditions, and RequestAuthentication's ``jwtRules``. Both registry
sources hand these fields here (through :mod:`.policy`), so the YAML file and
the Kubernetes API accept and refuse the same documents, with errors naming
the object and the field path.

Every value is checked for a shape that can match something at the waypoint:
a path is compared after normalisation (docs/waypoint.md), so a policy path
that is not itself normalised (``//admin``, ``/a/../b``, ``%61``) could never
match and is refused instead of silently doing nothing; a ``when`` key the
waypoint does not know is refused (the waypoint would treat the policy as
invalid). The key list mirrors ``node.policy.l7.parse_condition_key``; the
controller cannot import node code (layering), and the unit tables of both
sides use the same keys.

``jwksUri`` must be ``https://``; plain ``http://`` is accepted only for a
loopback host (a JWKS served by a local sidecar or a test server), because a
key set fetched in clear text from the network could be replaced in transit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import jwt

from controller.api.model import (
    Condition,
    JwtHeader,
    JwtRule,
    Labels,
    Operation,
    RequestAuthentication,
    TargetRef,
)

from .fields import (
    Fields,
    Invalid,
    check_cidr,
    check_dns1035_label,
    check_dns1123_subdomain,
    check_namespace_pattern,
    check_port,
    check_principal,
    show,
)

__all__ = [
    "CONDITION_KEYS",
    "GATEWAY_GROUP",
    "check_condition_key",
    "check_host",
    "check_jwks",
    "check_jwks_uri",
    "check_method",
    "check_path",
    "check_request_principal",
    "parse_condition",
    "parse_operation",
    "parse_request_authentication",
    "parse_target_refs",
]

GATEWAY_GROUP = "gateway.networking.k8s.io"

# The simple keys; claims and headers take a bracketed name.
CONDITION_KEYS = (
    "request.auth.claims[<name>]",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.headers[<name>]",
    "source.principal",
    "source.namespace",
    "source.ip",
    "destination.port",
)
_SIMPLE_KEYS = frozenset(k for k in CONDITION_KEYS if "[" not in k)
_CLAIMS_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]\s]+\])+)$")
_HEADER_KEY = re.compile(r"^request\.headers\[([!#$%&'*+.^_`|~0-9A-Za-z-]+)\]$")
_ISTIO_ONLY = {
    "remote.ip": "remote.ip comes from X-Forwarded-For; use source.ip",
    "destination.ip": "the waypoint does not match on the destination address",
    "connection.sni": "the waypoint does not terminate the application's TLS",
    "request.regex.headers": "regular expressions are not supported; use "
    "request.headers[<name>] with exact, prefix* or *suffix values",
}
_KEY_HINT = "supported keys: " + ", ".join(CONDITION_KEYS)

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_METHOD = re.compile(r"^[A-Z]+$")
_HOST_CHARS = re.compile(r"^[A-Za-z0-9.:\[\]-]+$")
_PATH_CHARS = re.compile(r"^[A-Za-z0-9\-._~!$&'()+,;=:@/*]*$")
_PATTERN_HINT = "write an exact value, '*', 'prefix*' or '*suffix' (one '*', at either end)"


def _need_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string ({what}), got {show(value)}", "quote the value in YAML")
    return value


def _pattern(value: object, what: str) -> tuple[str, str]:
    """(the value, its fixed part): Istio's exact / ``*`` / ``prefix*`` / ``*suffix``."""
    s = _need_str(value, what)
    if not s:
        raise Invalid(f"{what} is empty", _PATTERN_HINT)
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in s):
        raise Invalid(f"{show(s)}: {what} contains whitespace or control characters")
    stars = s.count("*")
    if s != "*" and (stars > 1 or (stars == 1 and not (s.startswith("*") or s.endswith("*")))):
        raise Invalid(
            f"{show(s)}: '*' may only be the whole value or its first or last character",
            _PATTERN_HINT,
        )
    return s, s.strip("*")


def check_method(value: object) -> str:
    """An HTTP method (``GET``), or a pattern over methods; upper case, as Istio requires."""
    s, fixed = _pattern(value, "a method")
    if fixed and not _METHOD.match(fixed):
        hint = "methods are upper-case HTTP method names, e.g. GET, POST, DELETE"
        if fixed.upper() != fixed and _METHOD.match(fixed.upper()):
            hint = f"write {s.upper()} (methods are upper case)"
        raise Invalid(f"{show(s)} is not an HTTP method", hint)
    return s


def check_path(value: object) -> str:
    """A request path pattern, as the waypoint sees paths: normalised, without the query.

    Exact and ``prefix*`` paths start with ``/``. Forms that normalisation
    removes (``//``, ``.`` and ``..`` segments, percent-encoding) and the query
    or fragment could never match, so they are refused with the form to write.
    """
    if isinstance(value, str) and ("{" in value or "}" in value):
        raise Invalid(
            f"{show(value)}: path templates ({{*}}, {{**}}) are not supported",
            "use 'prefix*' or '*suffix'",
        )
    s, fixed = _pattern(value, "a path")
    if s == "*":
        return s
    if not s.startswith("*") and not s.startswith("/"):
        raise Invalid(f"{show(s)} does not start with '/'", "write e.g. /pay, /admin* or *.json")
    if "?" in s or "#" in s:
        raise Invalid(
            f"{show(s)}: paths are matched without the query or fragment",
            "remove the part from '?' or '#'",
        )
    if "%" in s:
        raise Invalid(
            f"{show(s)}: paths are matched after percent-decoding, so an encoded path never "
            "matches",
            "write the decoded form (e.g. /admin, not /%61dmin)",
        )
    if not _PATH_CHARS.match(s):
        raise Invalid(f"{show(s)} has characters a normalised path never contains", _PATTERN_HINT)
    # A prefix may stop inside its last segment and a suffix start inside its
    # first: only whole segments are checked.
    segments = fixed.split("/")[1:]
    if s.endswith("*"):
        segments = segments[:-1]
    if "//" in fixed or any(seg in (".", "..") for seg in segments):
        raise Invalid(
            f"{show(s)} is not a normalised path (merged slashes, no '.' or '..' segments)",
            "requests are matched after normalisation; write the normalised form, e.g. /admin",
        )
    return s


def check_host(value: object) -> str:
    """A host pattern (``payments.shop``, ``*.example.com``, ``host:8080``)."""
    s, fixed = _pattern(value, "a host")
    if fixed and not _HOST_CHARS.match(fixed):
        raise Invalid(
            f"{show(s)} is not a host name or address",
            "write a DNS name or address, optionally with :port, e.g. payments.shop:80",
        )
    return s


def check_request_principal(value: object) -> str:
    """``<issuer>/<subject>`` of a JWT, or a pattern over it (``*``, ``https://idp/*``)."""
    s, _ = _pattern(value, "a request principal")
    if "*" not in s and "/" not in s:
        raise Invalid(
            f"{show(s)} is not a request principal",
            "write <issuer>/<subject> (e.g. https://idp.example/alice), or '*' for any valid JWT",
        )
    return s


def check_condition_key(value: object) -> str:
    s = _need_str(value, "a condition key")
    if s in _SIMPLE_KEYS or _CLAIMS_KEY.match(s) or _HEADER_KEY.match(s):
        return s
    base = s.split("[", 1)[0]
    if base in _ISTIO_ONLY:
        raise Invalid(f"{show(s)} is not supported: {_ISTIO_ONLY[base]}", _KEY_HINT)
    if base in ("request.auth.claims", "request.headers"):
        raise Invalid(
            f"{show(s)} needs a name in brackets",
            "write e.g. request.auth.claims[role], request.auth.claims[org][team] or "
            "request.headers[x-user]",
        )
    raise Invalid(f"{show(s)} is not a supported condition key", _KEY_HINT)


def _condition_value(key: str) -> Any:
    """The check for one value of a condition with ``key``; values stay strings."""
    if key == "source.ip":
        return check_cidr
    if key == "source.principal":
        return check_principal
    if key == "source.namespace":
        return check_namespace_pattern
    if key == "destination.port":
        return lambda v: str(check_port(v))
    return lambda v: _pattern(v, "a value")[0]


def parse_condition(raw: object, where: str, path: str) -> Condition:
    """One ``rules[].when[]`` entry: ``key`` and at least one of values / notValues."""
    f = Fields(raw, where, ("key", "values", "notValues"), path=path)
    key = f.value("key", check_condition_key)
    check = _condition_value(key)
    values = f.values("values", check)
    not_values = f.values("notValues", check)
    if not values and not not_values:
        f.fail(
            "values",
            f"condition {key} needs values or notValues",
            "list the values that must (values) or must not (notValues) be present",
        )
    return Condition(key=key, values=values, not_values=not_values)


_OPERATION_FIELDS = (
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
    "ports",
    "notPorts",
)


def parse_operation(raw: object, where: str, path: str) -> Operation:
    """One ``rules[].to[]`` entry: its ``operation`` (ports L4, the rest L7)."""
    wrapper = Fields(raw, where, ("operation",), path=path)
    op = wrapper.child("operation", _OPERATION_FIELDS)
    if op is None:
        wrapper.fail("operation", "is required in each to[] entry")
    return Operation(
        ports=op.values("ports", check_port),
        not_ports=op.values("notPorts", check_port),
        hosts=op.values("hosts", check_host),
        not_hosts=op.values("notHosts", check_host),
        methods=op.values("methods", check_method),
        not_methods=op.values("notMethods", check_method),
        paths=op.values("paths", check_path),
        not_paths=op.values("notPaths", check_path),
    )


_TARGET_REF_FIELDS = ("group", "kind", "name")
_TARGET_KINDS = {"Gateway": (GATEWAY_GROUP, ""), "Service": ("", "core")}


def _target_ref(raw: object, where: str, path: str) -> TargetRef:
    f = Fields(
        raw,
        where,
        _TARGET_REF_FIELDS,
        path=path,
        unsupported={
            "namespace": "a targetRef names an object in the policy's own namespace; "
            "remove namespace (or move the policy)"
        },
    )
    kind = f.text("kind")
    if kind not in _TARGET_KINDS:
        f.fail(
            "kind",
            f"{show(kind)} is not a supported target kind",
            "write Gateway (a waypoint, by name) or Service",
        )
    group = f.text("group", "")
    if group not in _TARGET_KINDS[kind]:
        allowed = " or ".join(repr(g) for g in _TARGET_KINDS[kind])
        f.fail("group", f"{show(group)} is not the group of a {kind}", f"write {allowed}")
    name = f.value("name", check_dns1035_label if kind == "Service" else check_dns1123_subdomain)
    return TargetRef(kind=kind, name=name, group=group if group != "core" else "")


def parse_target_refs(spec: Fields, selector: Labels | None) -> tuple[TargetRef, ...]:
    """``spec.targetRefs``; exclusive with ``selector``, as in Istio."""
    refs = tuple(_target_ref(item, spec.where, p) for p, item in spec.items("targetRefs"))
    if spec.present("targetRefs") and not refs:
        spec.fail("targetRefs", "must list at least one entry", "or remove targetRefs")
    if refs and selector is not None:
        spec.fail(
            "targetRefs",
            "selector and targetRefs cannot both be set",
            "use targetRefs to attach to a waypoint or Service, selector for ztunnel (L4) "
            "enforcement on workloads",
        )
    return refs


def check_jwks(value: object) -> str:
    """An inline JWKS document (JSON text) with at least one usable key."""
    s = _need_str(value, "a JWKS document as JSON text")
    try:
        data = json.loads(s)
    except ValueError as e:
        raise Invalid(f"is not JSON: {e}", 'write the JWKS as JSON text: {"keys": [...]}') from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise Invalid('must be a JSON object with a non-empty "keys" list')
    for i, key in enumerate(data["keys"]):
        if not isinstance(key, dict):
            raise Invalid(f"keys[{i}] is not a JSON object")
        kty = key.get("kty")
        if kty not in ("RSA", "EC", "OKP"):
            raise Invalid(
                f"keys[{i}]: key type {show(kty)} is not supported",
                "the waypoint verifies RS256 (kty RSA), ES256 (EC P-256) and EdDSA (OKP Ed25519)",
            )
        try:
            jwt.PyJWK(key)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as e:
            raise Invalid(f"keys[{i}] is not a usable {kty} key: {e}") from None
    return s


def check_jwks_uri(value: object) -> str:
    """``https://`` URL; ``http://`` only to a loopback host (see the module docstring)."""
    s = _need_str(value, "a URL")
    try:
        url = urlsplit(s)
        host = url.hostname or ""
        _ = url.port  # raises for a port out of range
    except ValueError as e:
        raise Invalid(f"{show(s)} is not a valid URL: {e}") from None
    if url.scheme not in ("https", "http") or not host:
        raise Invalid(f"{show(s)} is not an https URL", "write e.g. https://idp.example/jwks.json")
    if url.scheme == "http":
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        if not loopback:
            raise Invalid(
                f"{show(s)}: a key set fetched over plain http could be replaced in transit",
                "use https (http is accepted only for a loopback host)",
            )
    return s


_JWT_RULE_FIELDS = (
    "issuer",
    "audiences",
    "jwks",
    "jwksUri",
    "fromHeaders",
    "forwardOriginalToken",
)
_JWT_RULE_UNSUPPORTED = {
    "fromParams": "tokens are read from headers only; use fromHeaders",
    "fromCookies": "tokens are read from headers only; use fromHeaders",
    "outputPayloadToHeader": "the waypoint does not copy the payload to a header",
    "outputClaimToHeaders": "the waypoint does not copy claims to headers",
    "timeout": "the JWKS fetch timeout is a waypoint setting",
}


def _header_name(value: object) -> str:
    s = _need_str(value, "a header name")
    if not _TOKEN.match(s):
        raise Invalid(f"{show(s)} is not an HTTP header name", "write e.g. x-jwt-assertion")
    return s


def _issuer(value: object) -> str:
    s = _need_str(value, "an issuer")
    if not s or any(c.isspace() or ord(c) < 0x20 for c in s):
        raise Invalid(
            f"{show(s)} is not an issuer", "write the token's iss claim, e.g. https://idp.example"
        )
    if "*" in s:
        raise Invalid(f"{show(s)}: an issuer is exact, never a pattern")
    return s


def _jwt_rule(raw: object, where: str, path: str) -> JwtRule:
    f = Fields(raw, where, _JWT_RULE_FIELDS, path=path, unsupported=_JWT_RULE_UNSUPPORTED)
    issuer = f.value("issuer", _issuer)
    if f.has("jwks") and f.has("jwksUri"):
        f.fail("jwksUri", "jwks and jwksUri cannot both be set", "keep one of them")
    if not f.has("jwks") and not f.has("jwksUri"):
        f.fail(
            "jwks",
            "one of jwks (inline JSON) or jwksUri is required",
            "OpenID discovery from the issuer is not supported; give the key set's URL",
        )
    headers: list[JwtHeader] = []
    for hpath, item in f.items("fromHeaders"):
        h = Fields(item, where, ("name", "prefix"), path=hpath)
        prefix = h.text("prefix", "")
        headers.append(JwtHeader(name=h.value("name", _header_name), prefix=prefix))
    return JwtRule(
        issuer=issuer,
        audiences=f.values("audiences", lambda v: _pattern(v, "an audience")[0]),
        jwks=f.value("jwks", check_jwks, ""),
        jwks_uri=f.value("jwksUri", check_jwks_uri, ""),
        from_headers=tuple(headers),
        forward_original_token=f.flag("forwardOriginalToken", False),
    )


_RA_SPEC_FIELDS = ("selector", "targetRefs", "jwtRules")
_RA_SPEC_UNSUPPORTED = {
    "targetRef": "use targetRefs (a list)",
}


def parse_request_authentication(
    name: str,
    namespace: str,
    spec: Mapping[str, Any] | None,
    where: str,
    selector_of: Any,
) -> RequestAuthentication:
    """An Istio RequestAuthentication spec as a model value.

    ``selector_of(fields)`` reads ``spec.selector`` (shared with the policy
    parser). An issuer may appear once per object: two rules for one issuer
    would make the token's verification depend on their order.
    """
    fields = Fields(
        {} if spec is None else spec,
        where,
        _RA_SPEC_FIELDS,
        path="spec",
        unsupported=_RA_SPEC_UNSUPPORTED,
    )
    selector: Labels | None = selector_of(fields)
    refs = parse_target_refs(fields, selector)
    rules: list[JwtRule] = []
    seen: dict[str, str] = {}
    for path, item in fields.items("jwtRules"):
        rule = _jwt_rule(item, where, path)
        if rule.issuer in seen:
            fields.fail(
                path[len("spec.") :] + ".issuer",
                f"issuer {rule.issuer} is already configured at {seen[rule.issuer]}",
                "one rule per issuer; merge their audiences",
            )
        seen[rule.issuer] = path
        rules.append(rule)
    return RequestAuthentication(
        name=name,
        namespace=namespace,
        jwt_rules=tuple(rules),
        selector=selector,
        target_refs=refs,
    )
