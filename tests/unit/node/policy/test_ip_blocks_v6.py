"""ipBlocks and notIpBlocks with IPv6 sources (issue 9 §2).

A v6 CIDR matches v6 sources; a v4 block never matches a v6 address (nor the
reverse), including ``::/0`` against IPv4 and ``0.0.0.0/0`` against IPv6;
IPv4-mapped sources (dual-stack sockets) are matched as IPv4.
"""

from __future__ import annotations

import pytest

from controller.api.model import AuthorizationPolicy, PolicyAction, Rule, Source
from node.policy import Connection, evaluate
from node.policy.match import ConnectionFacts, compile_policy, parse_ip_block


def policy(action: PolicyAction, source: Source) -> AuthorizationPolicy:
    return AuthorizationPolicy("p", "shop", action, (Rule(sources=(source,)),))


def allows(src_ip: str, source: Source) -> bool:
    return evaluate(
        Connection(src_ip, "fd00:244:2::a", 8080), [policy(PolicyAction.ALLOW, source)]
    ).allowed


@pytest.mark.parametrize(
    ("block", "src", "allowed"),
    [
        ("fd00:244:1::/64", "fd00:244:1::a", True),
        ("fd00:244:1::/64", "fd00:244:2::a", False),
        ("fd00:244:1::a", "fd00:244:1::a", True),  # a bare address is a /128
        ("fd00:244:1::a", "fd00:244:1::b", False),
        ("FD00:244:1:0::/64", "fd00:244:1::a", True),  # any spelling of the block
        ("fd00:244:1::/64", "FD00:244:1:0:0:0:0:A", True),  # any spelling of the source
        ("fd00:244:1::a/64", "fd00:244:1::ff", True),  # host bits ignored, as Istio does
        ("::/0", "fd00:244:1::a", True),
        ("::/0", "10.244.1.10", False),  # a v6 block never matches IPv4
        ("0.0.0.0/0", "fd00:244:1::a", False),  # a v4 block never matches IPv6
        ("10.244.1.0/24", "fd00:244:1::a", False),
        ("10.244.1.0/24", "::ffff:10.244.1.10", True),  # mapped v4 is v4
        ("::ffff:0:0/96", "::ffff:10.244.1.10", False),  # ... and not a v6 source
        ("fd00:244:1::/64", "fd00:244:1::a%eth0", True),  # a zone does not change the address
        ("fd00:244:1::/64", "not-an-ip", False),
    ],
)
def test_ip_blocks_v6(block: str, src: str, allowed: bool) -> None:
    assert allows(src, Source(ip_blocks=(block,))) is allowed


@pytest.mark.parametrize(
    ("block", "src", "allowed"),
    [
        ("fd00:244:1::d", "fd00:244:1::d", False),
        ("fd00:244:1::d", "fd00:244:1::a", True),
        ("fd00:244:1::d", "10.244.1.13", True),  # v6 exclusion says nothing about IPv4
        ("10.244.1.13", "fd00:244:1::d", True),
    ],
)
def test_not_ip_blocks_v6(block: str, src: str, allowed: bool) -> None:
    assert allows(src, Source(not_ip_blocks=(block,))) is allowed


def test_deny_v6_block_denies_only_v6_sources() -> None:
    deny = policy(PolicyAction.DENY, Source(ip_blocks=("fd00:244:1::/64",)))
    assert not evaluate(Connection("fd00:244:1::a", "fd00:244:2::a", 80), [deny]).allowed
    assert evaluate(Connection("10.244.1.10", "10.244.2.10", 80), [deny]).allowed


def test_parse_ip_block_v6() -> None:
    assert str(parse_ip_block(" fd00:244:1::a/64 ")) == "fd00:244:1::/64"
    assert parse_ip_block("fd00::1").prefixlen == 128
    with pytest.raises(ValueError):
        parse_ip_block("fd00::/129")


def test_malformed_v6_block_makes_the_policy_invalid() -> None:
    compiled = compile_policy(policy(PolicyAction.ALLOW, Source(ip_blocks=("fd00:::1/64",))))
    assert compiled.invalid is not None and "ipBlocks" in compiled.invalid


def test_connection_facts_unmap_and_keep_v6() -> None:
    assert str(ConnectionFacts.of("::ffff:10.0.0.1", 80, None).src_ip) == "10.0.0.1"
    assert str(ConnectionFacts.of("FD00::A", 80, None).src_ip) == "fd00::a"
