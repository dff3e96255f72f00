"""Property tests (Hypothesis) for policy matching: CIDRs, principals, evaluation order."""

from __future__ import annotations

import ipaddress

from hypothesis import assume, given
from hypothesis import strategies as st

from controller.api.model import AuthorizationPolicy, Operation, PolicyAction, Rule, Source
from controller.api.spiffe import SpiffeId
from node.policy import Connection, ConnectionFacts, evaluate, parse_ip_block, string_matches
from node.policy.match import compile_policy
from node.state import normalize_ip

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
identities = st.builds(
    lambda ns, sa: SpiffeId.parse(f"spiffe://cluster.local/ns/{ns}/sa/{sa}"), names, names
)
maybe_identity = st.one_of(st.none(), identities)
ports = st.integers(min_value=1, max_value=65535)


def _src_match(source: Source, ip: str, identity: SpiffeId | None, port: int = 80) -> bool:
    p = AuthorizationPolicy("p", "ns", PolicyAction.ALLOW, (Rule(sources=(source,)),))
    return compile_policy(p).matches(ConnectionFacts.of(ip, port, identity))


@given(ipv4, st.integers(min_value=0, max_value=32), ipv4)
def test_ipv4_cidr_matches_like_ipaddress(
    net_addr: ipaddress.IPv4Address, prefix: int, ip: ipaddress.IPv4Address
) -> None:
    block = f"{net_addr}/{prefix}"
    expected = ip in ipaddress.ip_network(block, strict=False)
    assert _src_match(Source(ip_blocks=(block,)), str(ip), None) is expected
    assert _src_match(Source(not_ip_blocks=(block,)), str(ip), None) is not expected


@given(ipv6, st.integers(min_value=0, max_value=128), ipv6)
def test_ipv6_cidr_matches_like_ipaddress(
    net_addr: ipaddress.IPv6Address, prefix: int, ip: ipaddress.IPv6Address
) -> None:
    assume(ip.ipv4_mapped is None)
    block = f"{net_addr}/{prefix}"
    expected = ip in ipaddress.ip_network(block, strict=False)
    assert _src_match(Source(ip_blocks=(block,)), str(ip), None) is expected


@given(ipv4, ipv4)
def test_single_address_block_is_a_host_route(
    a: ipaddress.IPv4Address, b: ipaddress.IPv4Address
) -> None:
    assert _src_match(Source(ip_blocks=(str(a),)), str(b), None) is (a == b)


@given(ipv4)
def test_ipv4_mapped_source_matches_ipv4_blocks(ip: ipaddress.IPv4Address) -> None:
    mapped = f"::ffff:{ip}"
    assert normalize_ip(mapped) == str(ip)
    assert _src_match(Source(ip_blocks=(f"{ip}/32",)), mapped, None)


@given(st.text(max_size=30))
def test_garbage_blocks_never_parse_silently(text: str) -> None:
    try:
        net = parse_ip_block(text)
    except ValueError:
        return
    assert isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network)


@given(st.text(min_size=1, max_size=20).filter(lambda s: "*" not in s), st.text(max_size=20))
def test_patterns_without_star_are_literal(pattern: str, value: str) -> None:
    assert string_matches(pattern, value) is (pattern == value)


@given(st.text(max_size=20))
def test_star_means_present(value: str) -> None:
    assert string_matches("*", value) is bool(value)
    assert string_matches("*", None) is False


@given(identities, identities)
def test_principal_and_not_principal_are_complements(ident: SpiffeId, listed: SpiffeId) -> None:
    text = str(listed).removeprefix("spiffe://")
    pos = _src_match(Source(principals=(text,)), "10.0.0.1", ident)
    neg = _src_match(Source(not_principals=(text,)), "10.0.0.1", ident)
    assert pos is not neg
    assert pos is (ident == listed)
    # Both spellings of a principal are the same principal.
    assert _src_match(Source(principals=(str(listed),)), "10.0.0.1", ident) is pos


@given(names)
def test_plaintext_matches_no_positive_identity_field(ns: str) -> None:
    for source in (
        Source(principals=("*",)),
        Source(namespaces=(ns,)),
        Source(principals=(f"cluster.local/ns/{ns}/sa/x",)),
    ):
        assert not _src_match(source, "10.0.0.1", None)
    # ...and every negative identity field (Istio semantics).
    for source in (Source(not_principals=("*",)), Source(not_namespaces=(ns,))):
        assert _src_match(source, "10.0.0.1", None)


@given(ports, st.lists(ports, max_size=5), st.lists(ports, max_size=5))
def test_ports_and_not_ports(port: int, allowed: list[int], excluded: list[int]) -> None:
    p = AuthorizationPolicy(
        "p",
        "ns",
        PolicyAction.ALLOW,
        (Rule(operations=(Operation(tuple(allowed), tuple(excluded)),)),),
    )
    expected = (not allowed or port in allowed) and port not in excluded
    assert compile_policy(p).matches(ConnectionFacts.of("10.0.0.1", port, None)) is expected


sources = st.builds(
    Source,
    principals=st.lists(
        st.sampled_from(["*", "cluster.local/ns/a/sa/b", "cluster.local/ns/c/*"]), max_size=2
    ).map(tuple),
    namespaces=st.lists(st.sampled_from(["a", "c", "prod"]), max_size=2).map(tuple),
    not_namespaces=st.lists(st.sampled_from(["a", "c"]), max_size=1).map(tuple),
    ip_blocks=st.lists(
        st.sampled_from(["10.0.0.0/8", "192.168.0.0/16", "10.1.2.3"]), max_size=2
    ).map(tuple),
)
rules = st.builds(
    Rule,
    sources=st.lists(sources, max_size=2).map(tuple),
    operations=st.lists(
        st.builds(Operation, ports=st.lists(ports, max_size=2).map(tuple)), max_size=1
    ).map(tuple),
)
policies = st.builds(
    lambda i, action, rs: AuthorizationPolicy(f"p{i}", "prod", action, tuple(rs)),
    st.integers(0, 1000),
    st.sampled_from(PolicyAction),
    st.lists(rules, max_size=2),
)
conns = st.builds(
    Connection,
    src_ip=st.sampled_from(["10.1.2.3", "192.168.1.1", "172.16.0.1", "fd00::1"]),
    dst_ip=st.just("10.0.0.9"),
    dst_port=st.sampled_from([80, 443, 8080]),
    src_identity=st.one_of(
        st.none(),
        st.sampled_from(
            [
                SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"),
                SpiffeId.parse("spiffe://cluster.local/ns/c/sa/d"),
            ]
        ),
    ),
)


@given(st.lists(policies, max_size=5, unique_by=lambda p: p.name), conns)
def test_evaluation_order_matches_the_design(ps: list[AuthorizationPolicy], c: Connection) -> None:
    facts = ConnectionFacts.of(c.src_ip, c.dst_port, c.src_identity)
    deny_hit = any(p.action is PolicyAction.DENY and compile_policy(p).matches(facts) for p in ps)
    allows = [p for p in ps if p.action is PolicyAction.ALLOW]
    allow_hit = any(compile_policy(p).matches(facts) for p in allows)
    expected = (not deny_hit) and (not allows or allow_hit)
    v = evaluate(c, ps)
    assert v.allowed is expected
    assert evaluate(c, list(reversed(ps))).allowed is expected


@given(st.lists(policies, max_size=4, unique_by=lambda p: p.name), conns)
def test_adding_a_matching_deny_always_denies(ps: list[AuthorizationPolicy], c: Connection) -> None:
    blanket = AuthorizationPolicy("zz-deny", "prod", PolicyAction.DENY, (Rule(),))
    assert not evaluate(c, [*ps, blanket]).allowed
