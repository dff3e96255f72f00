"""L7 authorization: is this HTTP request allowed? (pure; the waypoint's engine)

:func:`compile_l7_policy` turns an AuthorizationPolicy into matchable values
once, when the waypoint's view of the state is built; :func:`evaluate_request`
decides one request against an :class:`L7PolicySet` in Istio's order:

1. any matching DENY policy denies;
2. if no ALLOW policy applies, allow;
3. any matching ALLOW policy allows;
4. otherwise deny.

A rule matches when any ``from`` entry, any ``to`` entry and every ``when``
condition match; an empty list matches everything. Within an entry every
non-empty field must match. String fields use Istio's forms (exact, ``*``,
``prefix*``, ``*suffix``, :func:`.match.string_matches`); ``hosts`` compare
case-insensitively and, when the pattern has no port, ignore the request's
port; ``paths`` are matched against the normalised path without its query
(:mod:`.path`). A ``not*`` field matches when no value of the attribute
matches, including when the request has no such attribute (no JWT: no
request principal).

``when`` keys: ``request.headers[<name>]``, ``request.auth.principal``,
``request.auth.audiences``, ``request.auth.presenter``,
``request.auth.claims[<name>]`` (nested: ``request.auth.claims[a][b]``; a
list claim matches when any element matches), ``source.principal``,
``source.namespace``, ``source.ip`` (CIDRs) and ``destination.port``. A
policy with any other key, or an unparsable ``source.ip``, is ``invalid``:
an invalid DENY denies every request, an invalid ALLOW allows none.

Attachment (:func:`attached_to`): at a waypoint only policies whose
``targetRefs`` name it (kind ``Gateway``) or the destination Service (kind
``Service``) apply; selector policies are the ztunnels' to enforce.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controller.api.model import AuthorizationPolicy, Condition, PolicyAction, TargetRef

from .authz import Verdict
from .match import IpNetwork, parse_ip_block, principal_text, string_matches

__all__ = [
    "L7Policy",
    "L7PolicySet",
    "RequestFacts",
    "attached_to",
    "compile_l7_policy",
    "evaluate_request",
    "parse_condition_key",
]

_CLAIMS = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")
_HEADER = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_EMPTY: Mapping[str, str] = MappingProxyType({})

Getter = Callable[["RequestFacts"], tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What L7 conditions look at, gathered once per request.

    ``headers`` has lower-case names; repeated headers are joined with ``,``.
    ``claims`` is None when the request carried no (accepted) JWT.
    """

    method: str
    host: str
    path: str  # normalised, without the query
    port: int
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    source_principal: str | None = None  # scheme-less SPIFFE ID of the HBONE peer
    source_namespace: str | None = None
    source_ip: str | None = None
    request_principal: str | None = None  # "<iss>/<sub>" of the verified JWT
    claims: Mapping[str, object] | None = None
    audiences: tuple[str, ...] = ()
    presenter: str | None = None


def _claim_values(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, bool):
        return ("true" if value else "false",)
    if isinstance(value, int | float):
        return (str(value),)
    if isinstance(value, list | tuple):
        out: list[str] = []
        for item in value:
            if not isinstance(item, list | tuple | dict):
                out.extend(_claim_values(item))
        return tuple(out)
    return ()


def _claims_getter(path: tuple[str, ...]) -> Getter:
    def get(r: RequestFacts) -> tuple[str, ...]:
        node: object = r.claims
        for name in path:
            if not isinstance(node, Mapping) or name not in node:
                return ()
            node = node[name]
        return _claim_values(node)

    return get


def _one(value: str | None) -> tuple[str, ...]:
    return (value,) if value else ()


def parse_condition_key(key: str) -> Getter | None:
    """The attribute reader for a ``when`` key; None for a key Veil does not know."""
    if m := _CLAIMS.match(key):
        names = tuple(part for part in m[1][1:-1].split("]["))
        return _claims_getter(names)
    if m := _HEADER.match(key):
        name = m[1].strip().lower()
        return lambda r: _one(r.headers.get(name))
    simple: dict[str, Getter] = {
        "request.auth.principal": lambda r: _one(r.request_principal),
        "request.auth.audiences": lambda r: r.audiences,
        "request.auth.presenter": lambda r: _one(r.presenter),
        "source.principal": lambda r: _one(r.source_principal),
        "source.namespace": lambda r: _one(r.source_namespace),
        "destination.port": lambda r: (str(r.port),),
    }
    return simple.get(key)


def _any(patterns: tuple[str, ...], values: tuple[str, ...]) -> bool:
    return any(string_matches(p, v) for p in patterns for v in values)


def _field(
    patterns: tuple[str, ...], not_patterns: tuple[str, ...], values: tuple[str, ...]
) -> bool:
    """A field pair: positive (empty: any; else some value matches) and negative."""
    if patterns and not _any(patterns, values):
        return False
    return not (not_patterns and _any(not_patterns, values))


@dataclass(frozen=True, slots=True)
class _Cond:
    get: Getter
    values: tuple[str, ...]
    not_values: tuple[str, ...]

    def matches(self, r: RequestFacts) -> bool:
        return _field(self.values, self.not_values, self.get(r))


@dataclass(frozen=True, slots=True)
class _IpCond:
    blocks: tuple[IpNetwork, ...]
    not_blocks: tuple[IpNetwork, ...]

    def matches(self, r: RequestFacts) -> bool:
        if not self.blocks and not self.not_blocks:
            return True  # most rules name no ipBlocks: parse nothing
        try:
            ip = ipaddress.ip_address((r.source_ip or "").split("%", 1)[0])
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped

        def inside(b: IpNetwork) -> bool:
            return ip is not None and ip.version == b.version and ip in b

        if self.blocks and not any(inside(b) for b in self.blocks):
            return False
        return not (self.not_blocks and any(inside(b) for b in self.not_blocks))


@dataclass(frozen=True, slots=True)
class _From:
    principals: tuple[str, ...]
    not_principals: tuple[str, ...]
    namespaces: tuple[str, ...]
    not_namespaces: tuple[str, ...]
    request_principals: tuple[str, ...]
    not_request_principals: tuple[str, ...]
    ip: _IpCond

    def matches(self, r: RequestFacts) -> bool:
        # Each field is read only when the rule names it (most name one or two).
        return (
            (
                not (self.principals or self.not_principals)
                or _field(self.principals, self.not_principals, _one(r.source_principal))
            )
            and (
                not (self.namespaces or self.not_namespaces)
                or _field(self.namespaces, self.not_namespaces, _one(r.source_namespace))
            )
            and (
                not (self.request_principals or self.not_request_principals)
                or _field(
                    self.request_principals,
                    self.not_request_principals,
                    _one(r.request_principal),
                )
            )
            and self.ip.matches(r)
        )


def _host_values(host: str) -> tuple[str, ...]:
    h = host.lower()
    if h.startswith("["):
        bare = h.split("]", 1)[0] + "]"
    else:
        bare = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    return (h,) if bare == h else (h, bare)


@dataclass(frozen=True, slots=True)
class _To:
    hosts: tuple[str, ...]
    not_hosts: tuple[str, ...]
    methods: tuple[str, ...]
    not_methods: tuple[str, ...]
    paths: tuple[str, ...]
    not_paths: tuple[str, ...]
    ports: tuple[str, ...]
    not_ports: tuple[str, ...]

    def matches(self, r: RequestFacts) -> bool:
        return (
            (
                not (self.methods or self.not_methods)
                or _field(self.methods, self.not_methods, _one(r.method))
            )
            and (
                not (self.paths or self.not_paths)
                or _field(self.paths, self.not_paths, _one(r.path))
            )
            and (
                not (self.ports or self.not_ports)
                or _field(self.ports, self.not_ports, (str(r.port),))
            )
            and (
                not (self.hosts or self.not_hosts)
                or _field(self.hosts, self.not_hosts, _host_values(r.host))
            )
        )


@dataclass(frozen=True, slots=True)
class _L7Rule:
    sources: tuple[_From, ...]
    operations: tuple[_To, ...]
    conditions: tuple[_Cond | _IpCond, ...]

    def matches(self, r: RequestFacts) -> bool:
        if self.sources and not any(s.matches(r) for s in self.sources):
            return False
        if self.operations and not any(o.matches(r) for o in self.operations):
            return False
        return all(c.matches(r) for c in self.conditions)


@dataclass(frozen=True, slots=True)
class L7Policy:
    """A compiled policy; ``invalid`` says why it could not be (fail closed)."""

    key: str
    action: PolicyAction
    rules: tuple[_L7Rule, ...]
    invalid: str | None = None

    def matches(self, r: RequestFacts) -> bool:
        """Any rule matches. No rules: matches nothing."""
        return any(rule.matches(r) for rule in self.rules)


@dataclass(frozen=True, slots=True)
class L7PolicySet:
    """The compiled policies that apply to one destination, in evaluation order."""

    deny: tuple[L7Policy, ...] = ()
    allow: tuple[L7Policy, ...] = ()

    @classmethod
    def of(cls, policies: Iterable[L7Policy]) -> L7PolicySet:
        ordered = sorted(policies, key=lambda p: p.key)
        return cls(
            deny=tuple(p for p in ordered if p.action is PolicyAction.DENY),
            allow=tuple(p for p in ordered if p.action is PolicyAction.ALLOW),
        )

    @classmethod
    def compile(cls, policies: Iterable[AuthorizationPolicy]) -> L7PolicySet:
        return cls.of(compile_l7_policy(p) for p in policies)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in (*self.deny, *self.allow))


def _condition(c: Condition) -> _Cond | _IpCond:
    if not c.values and not c.not_values:
        raise ValueError(f"when[{c.key}] needs values or notValues")
    if c.key == "source.ip":
        return _IpCond(
            tuple(parse_ip_block(v) for v in c.values),
            tuple(parse_ip_block(v) for v in c.not_values),
        )
    get = parse_condition_key(c.key)
    if get is None:
        raise ValueError(f"when key {c.key!r} is not supported")
    values, not_values = c.values, c.not_values
    if c.key == "source.principal":
        values = tuple(principal_text(v) for v in values)
        not_values = tuple(principal_text(v) for v in not_values)
    return _Cond(get, values, not_values)


def _compile_rules(policy: AuthorizationPolicy) -> tuple[_L7Rule, ...]:
    rules: list[_L7Rule] = []
    for rule in policy.rules:
        sources = tuple(
            _From(
                principals=tuple(principal_text(p) for p in s.principals),
                not_principals=tuple(principal_text(p) for p in s.not_principals),
                namespaces=s.namespaces,
                not_namespaces=s.not_namespaces,
                request_principals=s.request_principals,
                not_request_principals=s.not_request_principals,
                ip=_IpCond(
                    tuple(parse_ip_block(b) for b in s.ip_blocks),
                    tuple(parse_ip_block(b) for b in s.not_ip_blocks),
                ),
            )
            for s in rule.sources
        )
        operations = tuple(
            _To(
                hosts=tuple(h.lower() for h in o.hosts),
                not_hosts=tuple(h.lower() for h in o.not_hosts),
                methods=o.methods,
                not_methods=o.not_methods,
                paths=o.paths,
                not_paths=o.not_paths,
                ports=tuple(str(p) for p in o.ports),
                not_ports=tuple(str(p) for p in o.not_ports),
            )
            for o in rule.operations
        )
        conditions = tuple(_condition(c) for c in rule.conditions)
        rules.append(_L7Rule(sources, operations, conditions))
    return tuple(rules)


def compile_l7_policy(policy: AuthorizationPolicy) -> L7Policy:
    """Compiles ``policy`` for request matching; never raises (see ``invalid``)."""
    try:
        return L7Policy(policy.key, policy.action, _compile_rules(policy))
    except ValueError as e:
        return L7Policy(policy.key, policy.action, (), invalid=str(e))


def evaluate_request(request: RequestFacts, policies: L7PolicySet) -> Verdict:
    """The verdict for one request, naming the deciding policy and why."""
    for p in policies.deny:
        if p.invalid is not None:
            return Verdict(False, f"DENY policy {p.key} is invalid ({p.invalid})", p.key)
        if p.matches(request):
            return Verdict(False, f"denied by DENY policy {p.key}", p.key)
    if not policies.allow:
        return Verdict(True, "no ALLOW policy applies")
    for p in policies.allow:
        if p.invalid is None and p.matches(request):
            return Verdict(True, f"allowed by ALLOW policy {p.key}", p.key)
    return Verdict(False, "no ALLOW policy matched")


def attached_to(
    refs: Iterable[TargetRef],
    *,
    policy_namespace: str,
    namespace: str,
    waypoint: str,
    service: str | None = None,
) -> bool:
    """True when ``refs`` (of an object in ``policy_namespace``) name waypoint
    ``waypoint`` or Service ``service``, both in ``namespace``."""
    if policy_namespace != namespace:
        return False
    for ref in refs:
        if ref.kind == "Gateway" and ref.name == waypoint:
            return True
        if ref.kind == "Service" and service is not None and ref.name == service:
            return True
    return False
