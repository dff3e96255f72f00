"""Matching one connection against the parts of an AuthorizationPolicy.

Pure functions over frozen values. Semantics follow Istio (and its ztunnel):

- ``principals`` are SPIFFE IDs written with or without the ``spiffe://``
  scheme (``cluster.local/ns/x/sa/y`` is Istio's form). They are compared as
  strings, never as regular expressions. Istio's three wildcard forms are
  supported because they are plain string tests: ``*`` (any authenticated
  principal), ``prefix*`` and ``*suffix``. The same applies to namespaces.
- ``namespaces`` is the namespace of the verified source identity.
- ``ipBlocks`` are CIDRs or single addresses, tested on the source IP.
- ``ports`` are destination ports.
- Every ``not*`` field matches when no entry matches the connection's value,
  including when there is no value at all. So a plaintext connection (no
  principal) matches ``notPrincipals: ["*"]``, which is Istio's documented way
  to deny unauthenticated traffic, and does not match ``principals: [...]``.

A policy field that cannot be parsed (a malformed CIDR) makes the compiled
policy ``invalid``; evaluation then fails closed (see :mod:`.authz`).

L7 terms fail closed too, because a ztunnel cannot see them. A rule with any
L7 term (``requestPrincipals``, ``hosts``, ``methods``, ``paths`` and their
``not*`` forms, a ``when`` on anything but ``source.principal``,
``source.namespace``, ``source.ip`` or ``destination.port``) is compiled:

- in an ALLOW policy, to nothing: the rule never matches at L4;
- in a DENY policy, without its L7 terms: the L4 terms that are left decide,
  so ``DENY from ns foo, methods [DELETE]`` denies every connection from foo.

A policy attached by ``targetRefs`` belongs to the waypoint it names and is
not compiled into a ztunnel's policy sets at all (:attr:`CompiledPolicy.attached`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from controller.api.model import (
    AuthorizationPolicy,
    Condition,
    Operation,
    PolicyAction,
    Rule,
    Source,
)
from controller.api.spiffe import SpiffeId

__all__ = [
    "L4_CONDITION_KEYS",
    "CompiledPolicy",
    "ConnectionFacts",
    "compile_policy",
    "l7_terms",
    "parse_ip_block",
    "policy_matches",
    "principal_text",
    "string_matches",
]

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SCHEME = "spiffe://"
T = TypeVar("T")
# The `when` keys a ztunnel can evaluate; every other key is L7.
L4_CONDITION_KEYS = frozenset(
    {"source.principal", "source.namespace", "source.ip", "destination.port"}
)


def principal_text(value: str) -> str:
    """A principal in Istio's scheme-less form (``cluster.local/ns/x/sa/y``)."""
    return value[len(_SCHEME) :] if value.startswith(_SCHEME) else value


def string_matches(pattern: str, value: str | None) -> bool:
    """Istio string match: exact, ``*`` (present), ``prefix*`` or ``*suffix``.

    ``value`` None or empty (no identity) matches nothing, not even ``*``.
    """
    if not value:
        return False
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def parse_ip_block(block: str) -> IpNetwork:
    """``10.0.0.0/8`` or ``10.0.0.1`` (a /32) as a network; host bits are ignored.

    Raises ValueError for anything else.
    """
    text = block.strip()
    if not text:
        raise ValueError("empty IP block")
    return ipaddress.ip_network(text, strict=False)


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """What the policy conditions look at, extracted once per connection."""

    principal: str | None  # scheme-less SPIFFE ID of the verified peer, None if plaintext
    namespace: str | None  # namespace of the peer identity, None if not a workload identity
    src_ip: IpAddress | None
    dst_port: int

    @classmethod
    def of(cls, src_ip: str, dst_port: int, identity: SpiffeId | None) -> ConnectionFacts:
        try:
            ip: IpAddress | None = ipaddress.ip_address(src_ip.split("%", 1)[0])
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if identity is None:
            return cls(principal=None, namespace=None, src_ip=ip, dst_port=dst_port)
        wl = identity.workload
        return cls(
            principal=principal_text(str(identity)),
            namespace=wl[0] if wl is not None else None,
            src_ip=ip,
            dst_port=dst_port,
        )


@dataclass(frozen=True, slots=True)
class _Source:
    principals: tuple[str, ...]
    not_principals: tuple[str, ...]
    namespaces: tuple[str, ...]
    not_namespaces: tuple[str, ...]
    ip_blocks: tuple[IpNetwork, ...]
    not_ip_blocks: tuple[IpNetwork, ...]

    def matches(self, c: ConnectionFacts) -> bool:
        return (
            _pos(self.principals, lambda p: string_matches(p, c.principal))
            and _neg(self.not_principals, lambda p: string_matches(p, c.principal))
            and _pos(self.namespaces, lambda n: string_matches(n, c.namespace))
            and _neg(self.not_namespaces, lambda n: string_matches(n, c.namespace))
            and _pos(self.ip_blocks, lambda b: _in(c.src_ip, b))
            and _neg(self.not_ip_blocks, lambda b: _in(c.src_ip, b))
        )


@dataclass(frozen=True, slots=True)
class _L4Condition:
    key: str
    values: tuple[str, ...]
    not_values: tuple[str, ...]
    blocks: tuple[IpNetwork, ...] = ()
    not_blocks: tuple[IpNetwork, ...] = ()

    def matches(self, c: ConnectionFacts) -> bool:
        if self.key == "source.ip":
            return _pos(self.blocks, lambda b: _in(c.src_ip, b)) and _neg(
                self.not_blocks, lambda b: _in(c.src_ip, b)
            )
        value: str | None
        if self.key == "source.principal":
            value = c.principal
        elif self.key == "source.namespace":
            value = c.namespace
        else:  # destination.port
            value = str(c.dst_port)
        return _pos(self.values, lambda p: string_matches(p, value)) and _neg(
            self.not_values, lambda p: string_matches(p, value)
        )


@dataclass(frozen=True, slots=True)
class _Rule:
    sources: tuple[_Source, ...]
    operations: tuple[Operation, ...]
    conditions: tuple[_L4Condition, ...] = ()

    def matches(self, c: ConnectionFacts) -> bool:
        if self.sources and not any(s.matches(c) for s in self.sources):
            return False
        if self.operations and not any(_op_matches(o, c.dst_port) for o in self.operations):
            return False
        return all(cond.matches(c) for cond in self.conditions)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy with parsed IP blocks; ``invalid`` says why it could not be compiled."""

    key: str
    action: PolicyAction
    rules: tuple[_Rule, ...]
    invalid: str | None = None
    # Attached to a waypoint or service by targetRefs: never enforced at L4.
    attached: bool = False
    # Why the L4 form differs from the policy as written (L7 terms), or None.
    l7_note: str | None = None

    def matches(self, c: ConnectionFacts) -> bool:
        """Any rule matches. No rules: matches nothing (an ALLOW with no rules denies)."""
        return any(r.matches(c) for r in self.rules)


def _pos(values: tuple[T, ...], test: Callable[[T], bool]) -> bool:
    """A positive field: empty means "any", else some entry must match."""
    return not values or any(test(v) for v in values)


def _neg(values: tuple[T, ...], test: Callable[[T], bool]) -> bool:
    """A ``not*`` field: empty means "any", else no entry may match."""
    return not values or not any(test(v) for v in values)


def _in(ip: IpAddress | None, block: IpNetwork) -> bool:
    return ip is not None and ip.version == block.version and ip in block


def _op_matches(op: Operation, port: int) -> bool:
    if op.ports and port not in op.ports:
        return False
    return not (op.not_ports and port in op.not_ports)


def _compile_source(s: Source) -> _Source:
    return _Source(
        principals=tuple(principal_text(p) for p in s.principals),
        not_principals=tuple(principal_text(p) for p in s.not_principals),
        namespaces=s.namespaces,
        not_namespaces=s.not_namespaces,
        ip_blocks=tuple(parse_ip_block(b) for b in s.ip_blocks),
        not_ip_blocks=tuple(parse_ip_block(b) for b in s.not_ip_blocks),
    )


def l7_terms(rule: Rule) -> tuple[str, ...]:
    """The L7 fields a rule uses (empty: the rule is pure L4)."""
    found: list[str] = []
    for s in rule.sources:
        if s.request_principals:
            found.append("requestPrincipals")
        if s.not_request_principals:
            found.append("notRequestPrincipals")
    for o in rule.operations:
        for name, values in (
            ("hosts", o.hosts),
            ("notHosts", o.not_hosts),
            ("methods", o.methods),
            ("notMethods", o.not_methods),
            ("paths", o.paths),
            ("notPaths", o.not_paths),
        ):
            if values:
                found.append(name)
    found.extend(f"when[{c.key}]" for c in rule.conditions if c.key not in L4_CONDITION_KEYS)
    return tuple(dict.fromkeys(found))


def _l4_source(s: Source) -> Source:
    return Source(
        principals=s.principals,
        not_principals=s.not_principals,
        namespaces=s.namespaces,
        not_namespaces=s.not_namespaces,
        ip_blocks=s.ip_blocks,
        not_ip_blocks=s.not_ip_blocks,
    )


def _compile_condition(c: Condition) -> _L4Condition:
    if c.key == "source.ip":
        return _L4Condition(
            c.key,
            (),
            (),
            blocks=tuple(parse_ip_block(v) for v in c.values),
            not_blocks=tuple(parse_ip_block(v) for v in c.not_values),
        )
    return _L4Condition(c.key, c.values, c.not_values)


def _compile_rule(r: Rule) -> _Rule:
    """The L4 form of a rule; its L7 terms (if any) are dropped by the caller's choice."""
    return _Rule(
        sources=tuple(_compile_source(_l4_source(s)) for s in r.sources),
        operations=tuple(Operation(ports=o.ports, not_ports=o.not_ports) for o in r.operations),
        conditions=tuple(_compile_condition(c) for c in r.conditions if c.key in L4_CONDITION_KEYS),
    )


def compile_policy(policy: AuthorizationPolicy) -> CompiledPolicy:
    """Parses a policy's rules (IP blocks, principal forms) into matchable values.

    Called when a snapshot is built, once per policy object, never per
    connection; a malformed field gives an ``invalid`` policy instead of an error.
    Rules with L7 terms are compiled as the module docstring says.
    """
    rules: list[_Rule] = []
    notes: list[str] = []
    try:
        for i, r in enumerate(policy.rules):
            terms = l7_terms(r)
            if terms and policy.action is PolicyAction.ALLOW:
                notes.append(f"rule {i} uses {', '.join(terms)}: matches nothing at L4")
                continue
            if terms:
                notes.append(f"rule {i} uses {', '.join(terms)}: denies on its L4 terms alone")
            rules.append(_compile_rule(r))
    except ValueError as e:
        return CompiledPolicy(
            key=policy.key,
            action=policy.action,
            rules=(),
            invalid=f"bad ipBlocks entry: {e}",
            attached=bool(policy.target_refs),
        )
    return CompiledPolicy(
        key=policy.key,
        action=policy.action,
        rules=tuple(rules),
        attached=bool(policy.target_refs),
        l7_note="; ".join(notes) or None,
    )


def policy_matches(policy: AuthorizationPolicy, facts: ConnectionFacts) -> bool:
    """True when any rule of ``policy`` matches (ignores validity; see :mod:`.authz`)."""
    return compile_policy(policy).matches(facts)
