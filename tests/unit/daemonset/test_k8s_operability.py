"""daemonset/: what an SRE expects of the shipped objects, asserted on the objects as
rendered by ``kubectl kustomize`` (the form a cluster receives), plus the optional
monitoring/ and hardening/ sets and the Dockerfile targets they rely on."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from node.dataplane import AGENT_METRICS_PORT, METRICS_PORT
from tests.support.ci import require_tool

ROOT = Path(__file__).resolve().parents[3]
DAEMONSET = ROOT / "daemonset"
K8S_VERSION = "1.30"
NODE_IMAGE = "registry.example.com/veil/veil:0.1.0"
CONTROLLER_IMAGE = "registry.example.com/veil/veil-controller:0.1.0"
# perf/results/latest.json, bench_mesh: the largest ztunnel with 10,000 connections.
ZTUNNEL_RSS_10K_MB = 150.3


@functools.cache
def _rendered(path: str) -> tuple[dict[str, Any], ...]:
    kubectl = require_tool(
        "kubectl",
        "its built-in `kubectl kustomize` renders daemonset/; install the `kubectl` package "
        "from the pkgs.k8s.io apt repository (https://kubernetes.io/docs/tasks/tools/)",
    )
    out = subprocess.run(
        [kubectl, "kustomize", path], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def rendered(kind: str, path: Path = DAEMONSET) -> list[dict[str, Any]]:
    return [d for d in _rendered(str(path)) if d["kind"] == kind]


def node_pod() -> dict[str, Any]:
    (ds,) = rendered("DaemonSet")
    pod: dict[str, Any] = ds["spec"]["template"]["spec"]
    return pod


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert m, quantity
    return int(m[1]) * units[m[2]]


def test_every_pod_runs_on_linux_nodes_only() -> None:
    for kind in ("DaemonSet", "Deployment"):
        (obj,) = rendered(kind)
        assert obj["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_a_resource_quota_admits_the_critical_priority_classes() -> None:
    (quota,) = rendered("ResourceQuota")
    assert quota["metadata"]["namespace"] == "veil-system"
    (expr,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert expr["scopeName"] == "PriorityClass" and expr["operator"] == "In"
    used = {
        o["spec"]["template"]["spec"]["priorityClassName"]
        for o in rendered("DaemonSet") + rendered("Deployment")
    }
    assert used == {"system-node-critical", "system-cluster-critical"}
    assert used <= set(expr["values"])
    assert int(quota["spec"]["hard"]["pods"]) >= 5000  # never the limit that binds


def test_bpffs_is_mounted_by_an_init_step_and_propagates_to_the_agent() -> None:
    pod = node_pod()
    c = containers(pod)
    mount = c["mount-bpffs"]
    assert pod["initContainers"][0]["name"] == "mount-bpffs"  # before anything uses pins
    (vm,) = mount["volumeMounts"]
    assert vm == {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"}
    # Bidirectional needs privileged; it is the only privileged container.
    assert mount["securityContext"]["privileged"] is True
    privileged = [n for n, x in c.items() if x.get("securityContext", {}).get("privileged")]
    assert privileged == ["mount-bpffs"]
    script = mount["command"][-1]
    assert "stat -f -c %T /sys/fs/bpf" in script and "mount -t bpf bpffs /sys/fs/bpf" in script
    agent_mounts = {m["mountPath"]: m for m in c["agent"]["volumeMounts"]}
    assert agent_mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"


def test_kernel_headers_are_optional_mounts() -> None:
    volumes = {v["name"]: v for v in node_pod()["volumes"]}
    for name, path in (("lib-modules", "/lib/modules"), ("usr-src", "/usr/src")):
        assert volumes[name]["hostPath"] == {"path": path, "type": "DirectoryOrCreate"}
    mounts = {m["name"]: m for m in containers(node_pod())["agent"]["volumeMounts"]}
    assert mounts["lib-modules"]["readOnly"] and mounts["usr-src"]["readOnly"]


def test_resources_everywhere_and_ztunnel_requests_cover_10k_connections() -> None:
    for name, c in containers(node_pod()).items():
        res = c["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"], name
        assert mib(res["limits"]["memory"]) >= mib(res["requests"]["memory"]), name
    zt = containers(node_pod())["ztunnel"]["resources"]
    assert mib(zt["requests"]["memory"]) >= ZTUNNEL_RSS_10K_MB * 1e6 / 2**20
    latest = json.loads((ROOT / "perf" / "results" / "latest.json").read_text())
    measured = latest["benchmarks"]["mesh"]["metrics"]["ztunnel_rss_10k_connections"]["value"]
    assert mib(zt["requests"]["memory"]) >= measured  # MB from the benchmark, Mi here: margin


def test_join_retries_until_its_deadline() -> None:
    join = containers(node_pod())["join"]
    assert join["command"][:2] == ["/bin/sh", "-c"]
    script = join["command"][2]
    assert re.search(r"until veil node join\b", script)
    assert "--timeout" in script  # each attempt is bounded
    m = re.search(r"deadline=\$\(\( \$\(date \+%s\) \+ (\d+) \)\)", script)
    assert m and int(m[1]) >= 300
    assert "sleep" in script and "exit 1" in script
    for flag in (
        "--token-file /var/run/secrets/veil/token",
        "--ca-file /etc/veil/ca/root-cert.pem",
    ):
        assert flag in script


def test_join_script_runs_in_a_real_shell(tmp_path: Path) -> None:
    """The join loop retries a failing command and gives up at the deadline (here 0 s)."""
    script = containers(node_pod())["join"]["command"][2]
    script = re.sub(r"\+ \d+ \)\)", "+ 1 ))", script).replace("sleep 5", "sleep 0.2")
    fake = tmp_path / "veil"
    count = tmp_path / "count"
    fake.write_text(f"#!/bin/sh\necho x >> {count}\nexit 1\n")
    fake.chmod(0o755)
    done = subprocess.run(
        ["/bin/sh", "-c", script],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "VEIL_NODE_NAME": "n1"},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 1
    assert "giving up" in done.stderr
    assert len(count.read_text().split()) >= 2  # retried, not failed at once


def test_agent_seccomp_profile_is_shipped_and_allows_bpf() -> None:
    c = containers(node_pod())
    sc = c["agent"]["securityContext"]["seccompProfile"]
    assert sc == {"type": "Localhost", "localhostProfile": "veil/agent.json"}
    assert c["ztunnel"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    install = c["install-seccomp"]
    assert "/opt/veil/share/seccomp/veil-agent.json" in install["command"][-1]
    assert "/host/seccomp/veil/agent.json" in install["command"][-1]
    volumes = {v["name"]: v for v in node_pod()["volumes"]}
    assert volumes["kubelet-seccomp"]["hostPath"]["path"] == "/var/lib/kubelet/seccomp"
    profile = json.loads((DAEMONSET / "seccomp" / "veil-agent.json").read_text())
    blocked = {n for rule in profile["syscalls"] for n in rule["names"]}
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert not blocked & {"bpf", "perf_event_open", "setsockopt", "sendmsg", "socket"}
    assert {"kexec_load", "init_module", "ptrace", "mount", "open_by_handle_at"} <= blocked
    dockerfile = (DAEMONSET / "Dockerfile").read_text()
    assert (
        "COPY daemonset/seccomp/veil-agent.json /opt/veil/share/seccomp/veil-agent.json"
        in dockerfile
    )


def test_images_are_fully_qualified_and_the_controller_is_slim() -> None:
    for name, c in containers(node_pod()).items():
        assert c["image"] == NODE_IMAGE, name
    (deploy,) = rendered("Deployment")
    (ctl,) = deploy["spec"]["template"]["spec"]["containers"]
    assert ctl["image"] == CONTROLLER_IMAGE
    dockerfile = (DAEMONSET / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", dockerfile, re.M)
    names = [s for _, s in stages]
    assert "controller" in names and names[-1] == "node"  # node stays the default target
    slim = dockerfile.split("AS controller-build")[1].split("AS runtime-base")[0]
    assert "bpfcc" not in slim and "llvm" not in slim.lower() and "clang" not in slim
    assert "venv --system-site-packages" not in slim and "python3 -m venv /opt/veil" in slim


def test_agent_metrics_are_reachable_for_prometheus() -> None:
    (ds,) = rendered("DaemonSet")
    agent = containers(node_pod())["agent"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["VEIL_AGENT_METRICS_ADDRESS"]["value"] == f"[$(HOST_IP)]:{AGENT_METRICS_PORT}"
    names = [e["name"] for e in agent["env"]]
    assert names.index("HOST_IP") < names.index("VEIL_AGENT_METRICS_ADDRESS")  # expansion order
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_monitoring_set_scrapes_every_endpoint_and_ships_the_dashboard() -> None:
    monitoring = DAEMONSET / "monitoring"
    monitors = rendered("PodMonitor", monitoring)
    ports = set()
    for pm in monitors:
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        assert pm["spec"]["namespaceSelector"] == {"matchNames": ["veil-system"]}
        for ep in pm["spec"]["podMetricsEndpoints"]:
            assert ep["path"] == "/metrics"
            (relabel,) = [r for r in ep["relabelings"] if r.get("targetLabel") == "__address__"]
            ports.add(int(relabel["replacement"].rsplit(":", 1)[1]))
    assert ports == {15014, METRICS_PORT, AGENT_METRICS_PORT}
    (cm,) = rendered("ConfigMap", monitoring)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["veil.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in (
        "veil_agent_bpf_drops_total",
        "veil_agent_bpf_pod_drops_total",
        "veil_agent_enrolled_pods",
        "veil_controller_certificates_issued_total",
        "veil_controller_certificate_refusals_total",
        "veil_controller_watchers",
        "up",
    ):
        assert metric in exprs, metric
    for obj in rendered("ConfigMap", monitoring):
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_hardening_policy_validates_and_names_what_the_controller_creates() -> None:
    docs = [
        d
        for d in yaml.safe_load_all((DAEMONSET / "hardening" / "create-names.yaml").read_text())
        if d
    ]
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (policy,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert {r for rule in rules for r in rule["resources"]} == {"secrets", "configmaps", "leases"}
    assert all(rule["operations"] == ["CREATE"] for rule in rules)
    (check,) = policy["spec"]["validations"]
    for name in ("veil-ca", "veil-ca-root", "veil-controller"):
        assert f'"{name}"' in check["expression"]
    # And RBAC says why it cannot do this itself.
    rbac = (DAEMONSET / "rbac.yaml").read_text()
    assert "cannot be restricted by resourceNames" in rbac


@pytest.mark.parametrize("doc", ["docs/kubernetes.md"])
def test_docs_use_fully_qualified_resource_names(doc: str) -> None:
    text = (ROOT / doc).read_text()
    for short in ("authorizationpolic(?:y|ies)", "peerauthentications?"):
        pattern = rf"kubectl [^\n`]*\b{short}\b(?!\.security\.veil\.io)"
        for m in re.finditer(pattern, text):
            raise AssertionError(f"{doc}: `{m[0]}` would also match Istio's {short}")
