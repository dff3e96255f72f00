"""The controller API contract: generated code is fresh, the pb boundary holds,
and every model type survives the wire unchanged."""

from __future__ import annotations

import ast
import pathlib

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.api import generate
from controller.api.model import (
    AuthorizationPolicy,
    Labels,
    Namespace,
    Operation,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    ResourceType,
    Rule,
    Service,
    ServicePort,
    Source,
    TrustBundle,
    WatchUpdate,
    Workload,
)
from controller.api.wire import watch_response_to_pb, watch_update_from_pb

ROOT = pathlib.Path(__file__).resolve().parents[4]
ALLOWED_PB_IMPORTERS = {
    "controller/api/wire.py",
    "controller/api/client.py",
    "controller/api/veil_pb2_grpc.py",
    "controller/service.py",
}


def test_generated_code_is_fresh() -> None:
    fresh = generate.render()
    for name, text in fresh.items():
        committed = (generate.API_DIR / name).read_text()
        assert committed == text, f"controller/api/{name} is stale: run `make proto` and commit"


def _imports_pb(path: pathlib.Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [a.name for a in node.names]
        if any(n.rsplit(".", 1)[-1] in ("veil_pb2", "veil_pb2_grpc") for n in names):
            return True
    return False


def test_only_the_api_edge_imports_generated_code() -> None:
    offenders = []
    for room in ("veil", "controller", "node", "agent", "ztunnel", "lab", "cli"):
        for path in (ROOT / room).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if rel in ALLOWED_PB_IMPORTERS or rel.endswith("_pb2.py"):
                continue
            if _imports_pb(path):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], (
        f"only controller/api/{{wire,client}}.py and controller/service.py may import _pb2: {offenders}"
    )


# Kubernetes-shaped names: a Workload refuses names no identity can be made of.
names = st.from_regex(r"[a-z]([a-z0-9-]{0,19}[a-z0-9])?", fullmatch=True)
label_maps = st.dictionaries(names, names, max_size=4).map(Labels)
ips = st.ip_addresses(v=4).map(str)
sources = st.builds(
    Source,
    principals=st.lists(names, max_size=2).map(tuple),
    not_principals=st.lists(names, max_size=2).map(tuple),
    namespaces=st.lists(names, max_size=2).map(tuple),
    ip_blocks=st.lists(ips, max_size=2).map(tuple),
)
ports = st.integers(1, 65535)
rules = st.builds(
    Rule,
    sources=st.lists(sources, max_size=2).map(tuple),
    operations=st.lists(
        st.builds(Operation, ports=st.lists(ports, max_size=2).map(tuple)), max_size=2
    ).map(tuple),
)
resources = st.one_of(
    st.builds(Namespace, name=names, labels=label_maps),
    st.builds(
        Workload,
        name=names,
        namespace=names,
        service_account=names,
        node=names,
        ips=st.lists(ips, max_size=2).map(tuple),
        labels=label_maps,
        enrolled=st.booleans(),
        ready=st.booleans(),
    ),
    st.builds(
        Service,
        name=names,
        namespace=names,
        vips=st.lists(ips, max_size=2).map(tuple),
        ports=st.lists(
            st.builds(ServicePort, port=ports, target_port=ports, name=names), max_size=2
        ).map(tuple),
        selector=label_maps,
        endpoints=st.lists(names, max_size=3).map(tuple),
    ),
    st.builds(
        AuthorizationPolicy,
        name=names,
        namespace=names,
        action=st.sampled_from(PolicyAction),
        rules=st.lists(rules, max_size=2).map(tuple),
        selector=st.none() | label_maps,
    ),
    st.builds(
        PeerAuthentication,
        name=names,
        namespace=names,
        mode=st.sampled_from(PeerAuthMode),
        selector=st.none() | label_maps,
    ),
)


@settings(max_examples=60)
@given(
    upserts=st.lists(resources, max_size=5).map(tuple),
    removals=st.lists(st.tuples(st.sampled_from(ResourceType), names), max_size=3).map(tuple),
    bundle=st.none()
    | st.builds(
        TrustBundle,
        trust_domain=names,
        roots=st.lists(st.binary(max_size=8), max_size=2).map(tuple),
    ),
    version=st.integers(0, 2**63),
    snapshot=st.booleans(),
)
def test_watch_update_round_trips(
    upserts: tuple, removals: tuple, bundle: TrustBundle | None, version: int, snapshot: bool
) -> None:
    update = WatchUpdate("epoch-1", version, snapshot, upserts, removals, bundle)
    assert watch_update_from_pb(watch_response_to_pb(update)) == update
