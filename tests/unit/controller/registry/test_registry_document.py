"""The YAML registry document: the worked example, and every refusal naming object and field."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from controller.api.model import PeerAuthMode, PolicyAction, ServicePort
from controller.registry import (
    RegistryError,
    parse_registry,
    parse_registry_bytes,
    read_registry_file,
)

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "registry.yaml"

BASE = """
namespaces:
  - name: shop
    labels: {veil.io/dataplane-mode: ambient}
workloads:
  - {name: a, namespace: shop, serviceAccount: a, node: n1, ips: [10.244.1.1], labels: {app: a}}
"""


def with_base(extra: str) -> str:
    return BASE + extra


def test_example_registry_describes_the_demo_mesh() -> None:
    state = read_registry_file(EXAMPLE)
    assert state.trust_domain == "cluster.local"
    ns = {n.name: n for n in state.namespaces}
    assert ns["shop"].enrolled and not ns["legacy"].enrolled
    wl = {w.key: w for w in state.workloads}
    assert str(wl["shop/checkout"].identity) == "spiffe://cluster.local/ns/shop/sa/checkout"
    assert str(wl["shop/payments"].identity) == "spiffe://cluster.local/ns/shop/sa/payments"
    assert wl["shop/checkout"].enrolled and wl["shop/payments"].enrolled
    assert not wl["shop/batch"].enrolled  # pod opted out
    assert not any(w.enrolled for w in state.workloads if w.namespace == "legacy")
    for node, prefix, prefix6 in (
        ("node-a", "10.244.1.", "fd00:244:1::"),
        ("node-b", "10.244.2.", "fd00:244:2::"),
    ):
        pods = state.workloads_on(node)
        # Three application pods per node (node-a also runs the waypoint replica).
        assert len([w for w in pods if not w.waypoint]) == 3
        # Dual stack: one address of each family per pod.
        assert all(
            len(w.ips) == 2 and w.ips[0].startswith(prefix) and w.ips[1].startswith(prefix6)
            for w in pods
        )
    svc, api = state.services
    assert svc.key == "shop/payments" and svc.vips[0].startswith("10.96.")
    assert svc.endpoints == ("shop/payments",) and not svc.use_waypoint
    assert api.key == "shop/payments-api" and api.use_waypoint == "shop-waypoint"
    assert [w.key for w in state.workloads if w.waypoint] == ["shop/shop-waypoint-0"]
    policy, l7 = state.authorization_policies
    assert l7.target_refs and l7.rules[0].operations[0].methods == ("GET",)
    assert policy.action is PolicyAction.ALLOW
    assert policy.selector == {"app": "payments"}
    assert policy.rules[0].sources[0].principals == ("cluster.local/ns/shop/sa/checkout",)
    (peer,) = state.peer_authentications
    assert (peer.namespace, peer.mode, peer.selector) == ("shop", PeerAuthMode.STRICT, None)


def test_defaults() -> None:
    state = parse_registry(
        """
namespaces: [{name: shop}]
workloads: [{name: a, namespace: shop, node: n1, ips: ["fd00:0:0::1"]}]
services: [{name: s, namespace: shop, ports: [{port: 80}]}]
"""
    )
    (w,) = state.workloads
    assert (w.service_account, w.ready, w.enrolled, w.ips) == ("default", True, False, ("fd00::1",))
    assert state.trust_domain == "cluster.local"
    (s,) = state.services
    assert s.ports == (ServicePort(port=80, target_port=80),)
    assert s.vips == () and s.endpoints == ()  # no selector: no endpoints, as in Kubernetes


@pytest.mark.parametrize(
    "doc", ["", "# nothing yet\n", "\n\n", "---\n", "{}\n", "trustDomain: cluster.local\n"]
)
def test_empty_or_comment_only_document_is_an_error(doc: str) -> None:
    # A truncated file must never become an empty mesh (issue 9 section 1).
    with pytest.raises(RegistryError, match="workloads: \\[\\]") as info:
        parse_registry(doc)
    assert str(info.value).startswith("registry: the ")


def test_explicit_empty_lists_are_an_empty_registry() -> None:
    state = parse_registry("workloads: []\n")
    assert state.workloads == () and state.namespaces == ()
    assert parse_registry("namespaces: []\nauthorizationPolicies: []\n").namespaces == ()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            with_base("  - {name: b, namespace: shop, node: n1, ips: ['10.1.1']}\n"),
            'registry: workloads[1] (shop/b): field "ips[0]": "10.1.1" is not an IP address',
        ),
        (
            with_base("  - {name: b, namespace: shop, node: n1, ips: [10.244.1.1]}\n"),
            'workloads[1] (shop/b): field "ips[0]": 10.244.1.1 is already used by workloads[0] (shop/a)',
        ),
        (
            with_base("  - {name: a, namespace: shop, node: n1, ips: [10.244.1.2]}\n"),
            "workloads[1] (shop/a): duplicate key shop/a; workloads[0] (shop/a) has the same name",
        ),
        (
            with_base("  - {name: b, namespace: web, node: n1, ips: [10.244.1.2]}\n"),
            "workloads[1] (web/b): field \"namespace\": namespace 'web' is not declared",
        ),
        (
            with_base("  - {name: B, namespace: shop, node: n1, ips: [10.244.1.2]}\n"),
            'workloads[1] (shop/B): field "name": "B" is not a valid DNS-1123 subdomain',
        ),
        (
            with_base("  - {name: b, namespace: shop, ips: [10.244.1.2]}\n"),
            'workloads[1] (shop/b): field "node": is required',
        ),
        (
            with_base("  - {name: b, namespace: shop, node: n1, ips: []}\n"),
            'workloads[1] (shop/b): field "ips": must list at least one entry',
        ),
        (
            with_base("  - {name: b, namespace: shop, node: n1, ips: [10.244.1.2], ready: yes}\n"),
            'workloads[1] (shop/b): field "ready"',  # YAML 1.1 "yes" is a boolean: accepted
        ),
        (
            with_base("  - {name: b, namespace: shop, node: n1, ips: [10.244.1.2], ready: 'no'}\n"),
            'workloads[1] (shop/b): field "ready": expected true or false, got "no"',
        ),
        (
            with_base("  - {name: b, namespace: shop, node: n1, ips: [10.244.1.2], zone: x}\n"),
            'workloads[1] (shop/b): field "zone": unknown field',
        ),
        (
            with_base(
                "  - {name: b, namespace: shop, node: n1, ips: [10.244.1.2], labels: {on: x}}\n"
            ),
            # YAML 1.1 reads the key `on` as a boolean
            'workloads[1] (shop/b): field "labels": expected a string, got true (a boolean)',
        ),
        (
            with_base(
                "  - {name: b, namespace: shop, node: n1, ips: [10.244.1.2], labels: {x: on}}\n"
            ),
            'workloads[1] (shop/b): field "labels.x": expected a string, got true (a boolean)',
        ),
        (
            with_base("services: [{name: s, namespace: shop, ports: [{port: 70000}]}]\n"),
            'services[0] (shop/s): field "ports[0].port": port 70000 is out of range',
        ),
        (
            with_base(
                "services: [{name: s, namespace: shop, ports: [{port: 80, targetPort: -1}]}]\n"
            ),
            'services[0] (shop/s): field "ports[0].targetPort": port -1 is out of range',
        ),
        (
            with_base("services: [{name: s, namespace: shop, ports: [{port: 80}, {port: 80}]}]\n"),
            'services[0] (shop/s): field "ports[1].port": port 80 is already listed at ports[0]',
        ),
        (
            with_base("services: [{name: s, namespace: shop, ports: []}]\n"),
            'services[0] (shop/s): field "ports": must list at least one entry',
        ),
        (
            with_base("services: [{name: 1s, namespace: shop, ports: [{port: 80}]}]\n"),
            'field "name": "1s" is not a valid DNS-1035 label',
        ),
        (
            with_base(
                "services: [{name: s, namespace: shop, vips: [10.244.1.1], ports: [{port: 80}]}]\n"
            ),
            'services[0] (shop/s): field "vips[0]": 10.244.1.1 is already used by workloads[0] (shop/a)',
        ),
        (
            with_base(
                "authorizationPolicies: [{name: p, namespace: shop, spec: {action: AUDIT}}]\n"
            ),
            'authorizationPolicies[0] (shop/p): field "spec.action": AUDIT is not supported',
        ),
        (
            with_base("authorizationPolicies: [{name: p, namespace: web, spec: {}}]\n"),
            "authorizationPolicies[0] (web/p): field \"namespace\": namespace 'web' is not declared",
        ),
        (
            with_base("authorizationPolicies: [{name: p, namespace: shop, kind: X}]\n"),
            'authorizationPolicies[0] (shop/p): field "kind": unknown field',
        ),
        (
            with_base(
                "peerAuthentications: [{name: p, namespace: shop, spec: {mtls: {mode: DISABLE}}}]\n"
            ),
            'peerAuthentications[0] (shop/p): field "spec.mtls.mode": DISABLE is not supported',
        ),
        (
            with_base("namespaces: []\n"),
            'registry: line 7: duplicate key "namespaces" in one mapping',
        ),
        ("trustDomain: Cluster.Local\n", 'registry: field "trustDomain": invalid trust domain'),
        ("trustDomains: x\n", 'registry: field "trustDomains": unknown field'),
        ("- a\n- b\n", "registry: expected a mapping, got a list"),
        ("namespaces: {shop: {}}\n", 'registry: field "namespaces": expected a list'),
        ("namespaces: [{name: shop}, {name: shop}]\n", "namespaces[1] (shop): duplicate key shop"),
        ("namespaces: [{name: shop_1}]\n", 'namespaces[0] (shop_1): field "name"'),
        ("namespaces: [shop]\n", 'namespaces[0]: expected a mapping, got "shop"'),
        ("workloads: [{name: a\n", "registry: not valid YAML at line 2"),
        ("a: !!python/object:os.system {}\n", "not valid YAML"),
    ],
)
def test_refused_with_object_and_field(doc: str, message: str) -> None:
    if "ready: yes" in doc:
        assert parse_registry(doc).workloads[1].ready is True
        return
    with pytest.raises(RegistryError) as info:
        parse_registry(doc)
    assert message in str(info.value)


def test_unknown_top_level_field_lists_allowed() -> None:
    with pytest.raises(RegistryError) as info:
        parse_registry("workload: []\n")
    assert info.value.hint is not None
    assert "trustDomain, namespaces, workloads, services" in info.value.hint


def test_root_namespace_policy_needs_no_namespace_object() -> None:
    state = parse_registry(
        with_base(
            "authorizationPolicies: [{name: deny-all, namespace: veil-system, spec: {action: DENY}}]\n"
        )
    )
    assert state.authorization_policies[0].namespace == "veil-system"


def test_bytes_limits() -> None:
    with pytest.raises(RegistryError, match="not UTF-8"):
        parse_registry_bytes(b"namespaces: [\xff]", "f.yaml")
    assert parse_registry_bytes(BASE.encode(), "f.yaml").workloads[0].name == "a"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist") as info:
        read_registry_file(tmp_path / "nope.yaml")
    assert info.value.hint is not None and "examples/registry.yaml" in info.value.hint


@given(st.text(max_size=300))
def test_arbitrary_text_fails_only_with_registry_error(text: str) -> None:
    with contextlib.suppress(RegistryError):
        parse_registry(text)


_names = st.sampled_from(["shop", "web", "a", "b", "x y", "", "Shop"])
_values = st.one_of(_names, st.integers(-5, 70000), st.booleans(), st.none(), st.just("10.1.1.1"))
_objects = st.dictionaries(
    st.sampled_from(
        ["name", "namespace", "node", "ips", "labels", "ports", "vips", "spec", "port"]
    ),
    st.one_of(_values, st.lists(_values, max_size=3), st.dictionaries(_names, _values, max_size=2)),
    max_size=6,
)


@given(
    st.dictionaries(
        st.sampled_from(
            ["namespaces", "workloads", "services", "authorizationPolicies", "peerAuthentications"]
        ),
        st.lists(_objects, max_size=4),
        max_size=5,
    )
)
def test_arbitrary_documents_fail_only_with_registry_error(doc: dict[str, object]) -> None:
    try:
        parse_registry(yaml.safe_dump(doc))
    except RegistryError as e:
        assert str(e).startswith("registry: ")
