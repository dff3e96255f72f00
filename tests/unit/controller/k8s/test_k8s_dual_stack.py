"""Dual-stack Kubernetes objects become dual-stack workloads and services (issue 9 §2)."""

from __future__ import annotations

from typing import Any

from controller.k8s.convert import service_from, workload_from


def pod(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "payments-0", "namespace": "shop", "labels": {"app": "payments"}},
        "spec": {"nodeName": "node-b", "serviceAccountName": "payments"},
        "status": {"phase": "Running", **status},
    }


def test_every_pod_ip_is_carried_v6_included() -> None:
    w = workload_from(
        pod({"podIP": "10.244.2.10", "podIPs": [{"ip": "10.244.2.10"}, {"ip": "fd00:244:2::a"}]})
    )
    assert w is not None and w.ips == ("10.244.2.10", "fd00:244:2::a")


def test_ipv6_primary_pod() -> None:
    w = workload_from(
        pod({"podIP": "fd00:244:2::a", "podIPs": [{"ip": "fd00:244:2::a"}, {"ip": "10.244.2.10"}]})
    )
    assert w is not None and w.ips == ("fd00:244:2::a", "10.244.2.10")


def test_single_stack_pod_without_pod_ips_falls_back_to_pod_ip() -> None:
    w = workload_from(pod({"podIP": "fd00:244:2::a"}))
    assert w is not None and w.ips == ("fd00:244:2::a",)


def test_dual_stack_service_has_both_vips() -> None:
    svc, notes = service_from(
        {
            "metadata": {"name": "payments", "namespace": "shop"},
            "spec": {
                "clusterIP": "10.96.0.20",
                "clusterIPs": ["10.96.0.20", "fd00:96::20"],
                "ipFamilyPolicy": "RequireDualStack",
                "selector": {"app": "payments"},
                "ports": [{"port": 80, "targetPort": 8081, "protocol": "TCP"}],
            },
        }
    )
    assert svc is not None and not notes
    assert svc.vips == ("10.96.0.20", "fd00:96::20")
