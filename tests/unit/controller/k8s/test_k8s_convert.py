"""Kubernetes objects to RegistryState: table-driven, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.api.model import Labels, PeerAuthMode, PolicyAction, ServicePort
from controller.k8s.convert import convert, service_from, workload_from
from controller.k8s.kinds import AUTHORIZATION_POLICIES, PEER_AUTHENTICATIONS

Obj = dict[str, Any]


def ns(name: str, mode: str | None = None) -> Obj:
    labels = {"veil.io/dataplane-mode": mode} if mode else {}
    return {"metadata": {"name": name, "labels": labels}}


def pod(
    name: str,
    namespace: str = "shop",
    *,
    ip: str = "10.1.0.1",
    node: str = "node-a",
    sa: str = "default",
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    ready: bool = True,
    created: str = "2024-01-01T00:00:00Z",
    **spec: Any,
) -> Obj:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels or {},
            "creationTimestamp": created,
            "resourceVersion": "1",
        },
        "spec": {"nodeName": node, "serviceAccountName": sa, **spec},
        "status": {
            "phase": phase,
            "podIP": ip,
            "podIPs": [{"ip": ip}] if ip else [],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def svc(
    name: str,
    namespace: str = "shop",
    *,
    ip: str = "10.96.0.10",
    selector: dict[str, str] | None = None,
    ports: list[Obj] | None = None,
    **spec: Any,
) -> Obj:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "creationTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {
            "clusterIP": ip,
            "clusterIPs": [ip],
            "selector": selector,
            "ports": ports
            if ports is not None
            else [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
            **spec,
        },
    }


def policy(name: str, namespace: str = "shop", spec: Any = None, generation: int = 1) -> Obj:
    return {
        "metadata": {"name": name, "namespace": namespace, "generation": generation},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (pod("a"), ("shop/a", ("10.1.0.1",), True)),
        (pod("a", ready=False), ("shop/a", ("10.1.0.1",), False)),
        (pod("a", phase="Pending", ip=""), ("shop/a", (), False)),
        (pod("a", phase="Succeeded"), None),
        (pod("a", phase="Failed"), None),
        (pod("a", node=""), None),
        (pod("a", hostNetwork=True), None),
    ],
)
def test_workload_from_pod(obj: Obj, expected: tuple[str, tuple[str, ...], bool] | None) -> None:
    w = workload_from(obj)
    if expected is None:
        assert w is None
    else:
        assert w is not None
        assert (w.key, w.ips, w.ready) == expected


def test_terminating_pod_is_not_ready_and_sa_defaults() -> None:
    obj = pod("a")
    obj["metadata"]["deletionTimestamp"] = "2024-01-02T00:00:00Z"
    obj["spec"].pop("serviceAccountName")
    w = workload_from(obj)
    assert w is not None and not w.ready and w.service_account == "default"


def test_dual_stack_ips() -> None:
    obj = pod("a")
    obj["status"]["podIPs"] = [{"ip": "10.1.0.1"}, {"ip": "fd00::1"}]
    w = workload_from(obj)
    assert w is not None and w.ips == ("10.1.0.1", "fd00::1")


def test_enrollment_by_namespace_label_and_pod_opt_out() -> None:
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient"), ns("plain")],
        pods=[
            pod("in", ip="10.1.0.1"),
            pod("out", ip="10.1.0.2", labels={"veil.io/dataplane-mode": "none"}),
            pod("other", "plain", ip="10.1.0.3"),
        ],
    )
    enrolled = {w.key: w.enrolled for w in conv.state.workloads}
    assert enrolled == {"shop/in": True, "shop/out": False, "plain/other": False}
    assert conv.notes == ()


def test_service_endpoints_are_ready_selected_workloads() -> None:
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=[
            pod("web-1", ip="10.1.0.1", labels={"app": "web"}),
            pod("web-2", ip="10.1.0.2", labels={"app": "web"}, ready=False),
            pod("db", ip="10.1.0.3", labels={"app": "db"}),
        ],
        services=[svc("web", selector={"app": "web"})],
    )
    (web,) = conv.state.services
    assert web.endpoints == ("shop/web-1",)
    assert web.vips == ("10.96.0.10",)
    assert web.ports == (ServicePort(80, 8080, ""),)


def test_contested_ip_goes_to_the_newest_live_pod() -> None:
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=[
            pod("old", ip="10.1.0.9", created="2024-01-01T00:00:00Z"),
            pod("new", ip="10.1.0.9", created="2024-02-01T00:00:00Z"),
        ],
    )
    ips = {w.key: w.ips for w in conv.state.workloads}
    assert ips == {"shop/new": ("10.1.0.9",), "shop/old": ()}
    assert any("10.1.0.9" in n for n in conv.notes)


def test_objects_in_unseen_namespaces_wait() -> None:
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=[pod("a", ip="10.1.0.1"), pod("b", "late", ip="10.1.0.2")],
        services=[svc("s", "late")],
        authorization_policies=[policy("p", "late", {"action": "DENY"})],
    )
    assert [w.key for w in conv.state.workloads] == ["shop/a"]
    assert conv.state.services == ()
    assert conv.state.authorization_policies == ()
    assert len(conv.notes) == 2


def test_named_target_port_resolved_from_endpoint_slices() -> None:
    service = svc(
        "web",
        selector={"app": "web"},
        ports=[
            {"name": "http", "port": 80, "targetPort": "http-alt"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ],
    )
    slice_ = {
        "metadata": {
            "name": "web-abc",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "ports": [{"name": "http", "port": 8081, "protocol": "TCP"}],
        "endpoints": [],
    }
    model, notes = service_from(service, [slice_])
    assert model is not None and model.ports == (ServicePort(80, 8081, "http"),) and notes == []
    model, notes = service_from(service, [])
    assert model is not None and model.ports == () and len(notes) == 1


def test_external_name_and_headless_services() -> None:
    assert service_from(svc("ext", type="ExternalName"))[0] is None
    headless, _ = service_from(svc("h", ip="None", selector={"app": "x"}))
    assert headless is not None and headless.vips == ()


def test_selectorless_service_takes_endpoints_from_slices() -> None:
    slice_ = {
        "metadata": {
            "name": "manual-1",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "manual"},
        },
        "ports": [{"port": 8080}],
        "endpoints": [
            {
                "addresses": ["10.1.0.1"],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": "a", "namespace": "shop"},
            },
            {
                "addresses": ["10.1.0.2"],
                "conditions": {"ready": False},
                "targetRef": {"kind": "Pod", "name": "b", "namespace": "shop"},
            },
            {"addresses": ["10.9.9.9"]},
        ],
    }
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=[pod("a", ip="10.1.0.1"), pod("b", ip="10.1.0.2")],
        services=[svc("manual", selector=None)],
        endpoint_slices=[slice_],
    )
    assert conv.state.services[0].endpoints == ("shop/a",)


def test_policies_valid_and_invalid() -> None:
    good = policy(
        "allow-checkout",
        spec={
            "selector": {"matchLabels": {"app": "payments"}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/checkout"]}}],
                    "to": [{"operation": {"ports": ["8080"]}}],
                }
            ],
        },
    )
    bad = policy(
        "broken",
        spec={"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]},
        generation=4,
    )
    l7 = policy("l7", spec={"rules": [{"when": [{"key": "request.headers[x]"}]}]})
    root = policy("mesh-deny", "veil-system", {"action": "DENY", "rules": [{}]})
    peer = policy("strict", spec={"mtls": {"mode": "STRICT"}})
    peer_bad = policy("nope", spec={"mtls": {"mode": "DISABLE"}})
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=[],
        authorization_policies=[good, bad, l7, root],
        peer_authentications=[peer, peer_bad],
    )
    assert [p.key for p in conv.state.authorization_policies] == [
        "shop/allow-checkout",
        "veil-system/mesh-deny",
    ]
    allow = conv.state.authorization_policies[0]
    assert allow.action is PolicyAction.ALLOW and allow.selector == Labels({"app": "payments"})
    assert [(p.key, p.mode) for p in conv.state.peer_authentications] == [
        ("shop/strict", PeerAuthMode.STRICT)
    ]
    verdicts = {(v.kind, v.name): v for v in conv.verdicts}
    assert verdicts[(AUTHORIZATION_POLICIES, "allow-checkout")].accepted
    broken = verdicts[(AUTHORIZATION_POLICIES, "broken")]
    assert not broken.accepted and broken.generation == 4
    assert "AuthorizationPolicy shop/broken" in (broken.error or "")
    assert "ipBlocks" in (broken.error or "")
    assert not verdicts[(AUTHORIZATION_POLICIES, "l7")].accepted
    assert not verdicts[(PEER_AUTHENTICATIONS, "nope")].accepted
    assert "DISABLE" in (verdicts[(PEER_AUTHENTICATIONS, "nope")].error or "")


def test_spec_that_is_not_an_object_is_refused() -> None:
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop")],
        pods=[],
        authorization_policies=[policy("x", spec=["a"])],
    )
    assert conv.state.authorization_policies == ()
    assert not conv.verdicts[0].accepted


def test_same_input_same_state() -> None:
    kwargs: dict[str, Any] = {
        "namespaces": [ns("shop", "ambient"), ns("b")],
        "pods": [pod("x", ip="10.1.0.1"), pod("y", "b", ip="10.1.0.2")],
        "services": [svc("s", selector={"a": "b"})],
    }
    first = convert("cluster.local", **kwargs).state
    kwargs = {k: list(reversed(v)) for k, v in kwargs.items()}
    assert convert("cluster.local", **kwargs).state == first


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
_PATHS = [
    ("spec",),
    ("status",),
    ("metadata", "labels"),
    ("metadata", "deletionTimestamp"),
    ("spec", "nodeName"),
    ("spec", "ports"),
    ("spec", "selector"),
    ("spec", "clusterIPs"),
    ("status", "podIPs"),
    ("status", "conditions"),
    ("spec", "rules"),
    ("spec", "action"),
]


@st.composite
def mutated(draw: st.DrawFn, base: Obj) -> Obj:
    """A valid object with one field replaced by arbitrary JSON."""
    import copy

    obj = copy.deepcopy(base)
    path = draw(st.sampled_from(_PATHS))
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key), dict) else node
    node[path[-1]] = draw(json_values)
    return obj


objects = st.one_of(
    st.dictionaries(st.sampled_from(["metadata", "spec", "status"]), json_values, max_size=3),
    mutated(pod("m", ip="10.9.0.1")),
    mutated(svc("m", selector={"app": "x"})),
    mutated(policy("m", spec={"action": "DENY", "rules": [{}]})),
)


@settings(max_examples=100)
@given(st.lists(objects, max_size=4), st.lists(objects, max_size=3), st.lists(objects, max_size=3))
def test_convert_survives_arbitrary_objects(
    pods: list[Obj], services: list[Obj], policies: list[Obj]
) -> None:
    """API objects come off the network: malformed ones are skipped or refused, never a crash."""
    from controller.registry import RegistryError

    try:
        conv = convert(
            "cluster.local",
            namespaces=[ns("shop", "ambient")],
            pods=pods,
            services=services,
            authorization_policies=policies,
        )
    except RegistryError:
        return  # e.g. a name that is not a DNS label: refused with a reason
    assert len(conv.verdicts) == len(policies)


def test_conversion_cache_converts_only_what_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    import controller.k8s.convert as convert_module

    calls: list[str] = []
    real = convert_module.workload_from

    def counting(obj: Obj) -> Any:
        calls.append(obj["metadata"]["name"])
        return real(obj)

    monkeypatch.setattr(convert_module, "workload_from", counting)
    cache = convert_module.ConversionCache()
    pods = [pod("a", ip="10.1.0.1"), pod("b", ip="10.1.0.2")]
    bad = policy("bad", spec={"rules": [{"from": [{"source": {"ipBlocks": ["x"]}}]}]})
    bad["metadata"]["resourceVersion"] = "5"
    first = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=pods,
        authorization_policies=[bad],
        cache=cache,
    )
    assert sorted(calls) == ["a", "b"]
    calls.clear()
    changed = pod("b", ip="10.1.0.3")
    changed["metadata"]["resourceVersion"] = "2"
    second = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=[pods[0], changed],
        authorization_policies=[bad],
        cache=cache,
    )
    assert calls == ["b"]
    assert {w.key: w.ips for w in second.state.workloads} == {
        "shop/a": ("10.1.0.1",),
        "shop/b": ("10.1.0.3",),
    }
    assert second.verdicts == first.verdicts  # the refusal is remembered with its reason
    # Objects that went away leave the cache.
    convert("cluster.local", namespaces=[ns("shop")], pods=[changed], cache=cache)
    assert list(cache.pods) == [("shop", "b")] and cache.policies == {}


def _source_policy(name: str, field: str, value: str) -> Obj:
    return policy(name, spec={"rules": [{"from": [{"source": {field: [value]}}]}]})


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("principals", "shop/checkout", "has 2 '/'-separated segments"),
        ("principals", "cluster.local/ns/shop/checkout", "has 4 '/'-separated segments"),
        ("notPrincipals", "cluster.local/veil/node/node-a", "is a node identity"),
        ("principals", "cluster.local/ns/*/sa/x", "'*' may only be the whole value"),
        ("principals", "*shop*", "'*' may only be"),
        ("namespaces", "sh*op", "'*' may only be"),
        ("notNamespaces", "Shop*", "cannot match any namespace name"),
    ],
)
def test_crd_policy_with_malformed_principal_is_refused_naming_the_field(
    field: str, value: str, problem: str
) -> None:
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=[],
        authorization_policies=[_source_policy("p", field, value)],
    )
    assert conv.state.authorization_policies == ()
    (verdict,) = conv.verdicts
    assert not verdict.accepted
    error = verdict.error or ""
    assert error.startswith(
        f'AuthorizationPolicy shop/p: field "spec.rules[0].from[0].source.{field}[0]": '
    ), error
    assert problem in error, error


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("principals", "*"),
        ("principals", "cluster.local/ns/shop/*"),
        ("principals", "*/sa/checkout"),
        ("notPrincipals", "spiffe://cluster.local/ns/shop/sa/checkout"),
        ("namespaces", "*"),
        ("namespaces", "shop-*"),
        ("notNamespaces", "*-prod"),
    ],
)
def test_crd_policy_accepts_istio_wildcards_as_the_yaml_registry_does(
    field: str, value: str
) -> None:
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=[],
        authorization_policies=[_source_policy("p", field, value)],
    )
    (verdict,) = conv.verdicts
    assert verdict.accepted, verdict.error
    assert [p.key for p in conv.state.authorization_policies] == ["shop/p"]


def test_crd_policy_warnings_foreign_trust_domain_and_empty_selector() -> None:
    foreign = _source_policy("foreign", "principals", "example.org/ns/shop/sa/checkout")
    nobody = policy(
        "nobody",
        spec={"selector": {"matchLabels": {"app": "gone"}}, "rules": [{}]},
    )
    fine = policy("fine", spec={"selector": {"matchLabels": {"app": "web"}}, "rules": [{}]})
    conv = convert(
        "cluster.local",
        namespaces=[ns("shop", "ambient")],
        pods=[pod("a", labels={"app": "web"})],
        authorization_policies=[foreign, nobody, fine],
    )
    # Warnings do not refuse anything: all three are applied.
    assert len(conv.state.authorization_policies) == 3
    warnings = [n for n in conv.notes if n.startswith("warning: ")]
    assert len(warnings) == 2, conv.notes
    assert any(
        "shop/foreign" in w and "'example.org'" in w and "principals[0]" in w for w in warnings
    )
    assert any("shop/nobody" in w and "app=gone matches no workload" in w for w in warnings)
