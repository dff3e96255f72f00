"""daemonset/ and examples/k8s/: every manifest validates against the Kubernetes 1.30
schemas (kubernetes-validate ships them, no network), and every example policy against
its CRD's OpenAPI schema (jsonschema) and Veil's own policy parser.
"""

from __future__ import annotations

import copy
import functools
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller.registry import parse_authorization_policy, parse_peer_authentication
from tests.support.ci import require_tool

ROOT = Path(__file__).resolve().parents[3]
DAEMONSET = ROOT / "daemonset"
EXAMPLES = ROOT / "examples" / "k8s"
K8S_VERSION = "1.30"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in DAEMONSET.glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def _parsed() -> tuple[dict[str, Any], ...]:
    return tuple(d for p in manifest_files() for d in documents(p))


def all_objects() -> list[dict[str, Any]]:
    """Copies, so a test that edits one cannot affect another."""
    return copy.deepcopy(list(_parsed()))


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in all_objects() if d["kind"] == kind]


def crd_schema(kind: str) -> dict[str, Any]:
    (crd,) = [c for c in by_kind("CustomResourceDefinition") if c["spec"]["names"]["kind"] == kind]
    (version,) = crd["spec"]["versions"]
    return _to_json_schema(version["schema"]["openAPIV3Schema"])


def _to_json_schema(node: Any) -> Any:
    """OpenAPI v3 structural schema -> JSON Schema (int-or-string becomes anyOf)."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifests_validate_against_kubernetes_1_30(path: Path) -> None:
    docs = documents(path)
    assert docs
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


def test_strict_validation_catches_a_typo() -> None:
    """The validator is not vacuous: an unknown field in a DaemonSet fails."""
    (ds,) = by_kind("DaemonSet")
    broken = copy.deepcopy(ds)
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DAEMONSET / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())


def test_kustomize_renders() -> None:
    # Fails instead of skipping when CI is set: the machine image ships kubectl.
    kubectl = require_tool(
        "kubectl",
        "its built-in `kubectl kustomize` renders daemonset/; install the `kubectl` package "
        "from the pkgs.k8s.io apt repository (https://kubernetes.io/docs/tasks/tools/)",
    )
    out = subprocess.run(
        [kubectl, "kustomize", str(DAEMONSET)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in all_objects()
    )


def test_daemonset_shape() -> None:
    (ds,) = by_kind("DaemonSet")
    spec = ds["spec"]
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["automountServiceAccountToken"] is False
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"agent", "ztunnel"}
    # Liveness never asks what a controller outage takes away (issue: a
    # liveness probe on readiness restarted every ztunnel during an outage).
    zt = containers["ztunnel"]
    agent = containers["agent"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        for c in (zt, agent):
            assert "httpGet" not in c[probe], (c["name"], probe)
        assert agent[probe]["exec"]["command"][:3] == ["veil", "agent", "health"], probe
    assert "--ready" in agent["readinessProbe"]["exec"]["command"]
    assert "--ready" not in agent["livenessProbe"]["exec"]["command"]
    # The ztunnel's probes: the standard-library client on its health socket.
    env = {e["name"]: e for e in zt["env"]}
    sock = Path(env["VEIL_ZTUNNEL_HEALTH_SOCKET"]["value"])
    probe_cmd = ["python", "-m", "veil.probe", str(sock)]
    assert zt["readinessProbe"]["exec"]["command"] == [*probe_cmd, "ready"]
    assert zt["livenessProbe"]["exec"]["command"] == [*probe_cmd, "live"]
    assert zt["startupProbe"]["exec"] == zt["readinessProbe"]["exec"]
    # Surge: answers only this pod's instance can give (docs/kubernetes.md,
    # "Rolling updates and readiness"). The ztunnel's health socket sits in a
    # per-pod emptyDir, never a host path both pods share.
    (mount,) = [m for m in zt["volumeMounts"] if sock.is_relative_to(m["mountPath"])]
    volumes_by_name = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes_by_name[mount["name"]]
    assert "hostPath" not in volumes_by_name[mount["name"]]
    assert "--this-pod" in agent["startupProbe"]["exec"]["command"]
    assert "--this-pod" in agent["readinessProbe"]["exec"]["command"]
    # Liveness must not restart the old pod's agent once the new one took over.
    assert "--this-pod" not in agent["livenessProbe"]["exec"]["command"]
    agent_env = {e["name"]: e for e in agent["env"]}
    assert agent_env["VEIL_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    inits = {c["name"]: c for c in pod["initContainers"]}
    for c in [*pod["containers"], *pod["initContainers"]]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        if c["name"] == "mount-bpffs":
            continue  # the one privileged step: test_bpffs_is_mounted_by_an_init_step
        assert not sc.get("privileged", False)
        assert sc["capabilities"]["drop"] == ["ALL"]
    assert list(inits) == ["mount-bpffs", "install-seccomp", "join"]
    assert set(containers["agent"]["securityContext"]["capabilities"]["add"]) == {
        "NET_ADMIN",
        "BPF",
        "PERFMON",
    }
    assert containers["ztunnel"]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    mounts = {m["mountPath"]: m for m in containers["agent"]["volumeMounts"]}
    assert mounts["/lib/modules"]["readOnly"] and mounts["/usr/src"]["readOnly"]
    assert "/sys/fs/bpf" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    (source,) = volumes["veil-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "veil"


def test_controller_shape() -> None:
    (deploy,) = by_kind("Deployment")
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    (ctl,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in ctl["ports"]}
    assert ports == {"grpc-mtls": 15012, "grpc-join": 15013, "http-monitoring": 15014}
    env = {e["name"]: e.get("value") for e in ctl["env"]}
    # Bound beyond loopback inside the pod, so the kubelet and Prometheus reach it.
    assert env["VEIL_HEALTH_ADDR"] == "0.0.0.0:15014"
    probes = {k: ctl[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert all(p["port"] == "http-monitoring" for p in probes.values())
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/healthz/ready"
    assert probes["livenessProbe"]["path"] == "/healthz/live"
    # Sized for a large first list: at least 5 minutes before a restart.
    startup = ctl["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "15014"
    assert annotations["prometheus.io/path"] == "/metrics"
    # The slim image, fully qualified.
    assert ctl["image"] == "registry.example.com/veil/veil-controller:0.1.0"
    assert int(ctl["resources"]["requests"]["memory"].removesuffix("Mi")) >= 140
    (svc,) = by_kind("Service")
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [15012, 15013]
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deploy["spec"]["selector"]


def test_rbac_least_privilege() -> None:
    rules = [r for role in by_kind("ClusterRole") + by_kind("Role") for r in role["rules"]]
    # Only the controller's roles exist; the node service account is bound to nothing.
    bindings = by_kind("ClusterRoleBinding") + by_kind("RoleBinding")
    subjects = {s["name"] for b in bindings for s in b["subjects"]}
    assert subjects == {"veil-controller"}
    token_reviews = [r for r in rules if "tokenreviews" in r["resources"]]
    assert token_reviews == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    for r in rules:
        assert "*" not in r["verbs"] and "*" not in r["resources"]
        if "secrets" in r["resources"] and set(r["verbs"]) - {"create"}:
            assert r["resourceNames"] == ["veil-ca", "cacerts"]
    # Policy objects: read and status only, never the spec.
    policy_writes = [
        r
        for r in rules
        if r["apiGroups"] == ["security.veil.io"] and set(r["verbs"]) - {"list", "watch", "get"}
    ]
    assert all(res.endswith("/status") for r in policy_writes for res in r["resources"])


@pytest.mark.parametrize("kind", ["AuthorizationPolicy", "PeerAuthentication"])
@pytest.mark.parametrize("selector", [{}, {"matchLabels": {}}, {"matchLabels": {"app": "x"}}])
def test_crd_selector_is_optional_and_may_be_empty(kind: str, selector: dict[str, Any]) -> None:
    """As in Istio: ``selector: {}`` means the whole namespace, and is accepted."""
    spec: dict[str, Any] = {"selector": selector}
    if kind == "PeerAuthentication":
        spec["mtls"] = {"mode": "STRICT"}
    obj = {
        "apiVersion": "security.veil.io/v1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "shop"},
        "spec": spec,
    }
    jsonschema.validate(obj, crd_schema(kind))
    parse = (
        parse_authorization_policy if kind == "AuthorizationPolicy" else parse_peer_authentication
    )
    parsed = parse("x", "shop", spec, f"{kind} x")
    assert not parsed.selector or selector.get("matchLabels")


def test_crds_are_structural_with_enums_and_required_fields() -> None:
    authz = crd_schema("AuthorizationPolicy")
    spec = authz["properties"]["spec"]["properties"]
    assert spec["action"]["enum"] == ["ALLOW", "DENY"]
    assert authz["required"] == ["spec"]
    peer = crd_schema("PeerAuthentication")
    mtls = peer["properties"]["spec"]["properties"]["mtls"]
    assert mtls["properties"]["mode"]["enum"] == ["UNSET", "PERMISSIVE", "STRICT"]
    assert mtls["required"] == ["mode"]

    def walk(node: Any, path: str) -> None:
        # Structural: every node has a type, except int-or-string leaves.
        if isinstance(node, dict) and ("properties" in node or "items" in node or "enum" in node):
            assert "type" in node, path
        if isinstance(node, dict):
            for k, v in node.get("properties", {}).items():
                walk(v, f"{path}.{k}")
            if "items" in node:
                walk(node["items"], f"{path}[]")

    for crd in by_kind("CustomResourceDefinition"):
        walk(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], crd["metadata"]["name"])


def example_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(EXAMPLES.glob("*.yaml")) for d in documents(p)]


@pytest.mark.parametrize(
    "obj", example_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}"
)
def test_examples_validate_and_parse(obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    if obj["apiVersion"] != "security.veil.io/v1":
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return
    jsonschema.validate(obj, crd_schema(obj["kind"]))
    parse = (
        parse_authorization_policy
        if obj["kind"] == "AuthorizationPolicy"
        else parse_peer_authentication
    )
    parse(meta["name"], meta["namespace"], obj["spec"], f"{obj['kind']} {meta['name']}")


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("AuthorizationPolicy", {"action": "AUDIT"}),
        ("AuthorizationPolicy", {"action": "allow"}),
        ("AuthorizationPolicy", {"rules": {"from": []}}),
        ("AuthorizationPolicy", {"selector": {"matchLabels": {"app": 1}}}),
        ("AuthorizationPolicy", {"selector": []}),
        ("AuthorizationPolicy", {"rules": [{"from": [{}]}]}),
        ("AuthorizationPolicy", {"rules": [{"to": [{"operation": {"ports": [True]}}]}]}),
        ("PeerAuthentication", {"mtls": {"mode": "DISABLE"}}),
        ("PeerAuthentication", {"mtls": {}}),
        ("AuthorizationPolicy", None),
    ],
)
def test_crd_schema_rejects_invalid_objects(kind: str, spec: Any) -> None:
    obj: dict[str, Any] = {
        "apiVersion": "security.veil.io/v1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "shop"},
    }
    if spec is not None:
        obj["spec"] = spec
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, crd_schema(kind))
