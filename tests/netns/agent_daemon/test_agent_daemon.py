"""The agent daemon on a real kernel, with a real controller and a registry file.

The tests share one lab (see conftest) and run in file order: each leaves the
node healthy for the next, and the last one uninstalls.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time
from typing import Any

from pyroute2 import IPRoute

from agent.net import routing, tc
from agent.net.tc import Hook
from lab import in_netns

from .conftest import AgentNode, json_out, probe, registry_doc, veil

SERVER = "10.244.2.10"


def veil_filters(env: AgentNode) -> dict[str, set[str]]:
    """Veil's tc filters in the node namespace: interface name -> {hook}."""
    out: dict[str, set[str]] = {}
    with in_netns(env.node.netns):
        ipr = IPRoute()
    try:
        for link in ipr.get_links():
            for f in tc.list_bpf_filters(ipr, link["index"]):
                if f.ours:
                    out.setdefault(link.get_attr("IFLA_IFNAME"), set()).add(str(f.hook))
    finally:
        ipr.close()
    return out


def wait_pod(env: AgentNode, key: str, dataplane: str, timeout: float = 10.0) -> None:
    env.wait_for(
        f"{key} {dataplane} and attached",
        lambda: (
            (row := env.pods().get(key)) is not None
            and row["dataplane"] == dataplane
            and row["attached"]
        ),
        timeout,
    )


def test_enrolls_local_pods_and_reports_them(agent_node: AgentNode) -> None:
    env = agent_node
    pods = env.pods()
    for key in ("shop/client", "shop/other"):
        assert pods[key]["dataplane"] == "enrolled" and pods[key]["protected"], pods[key]
        assert pods[key]["state"] == "ok"
    assert pods["legacy/plain"]["dataplane"] == "tracked"
    assert "legacy/server" not in pods  # on node-b
    client = env.pod("client")
    assert pods["shop/client"]["veth"] == client.host_veth

    assert probe(client, SERVER) == "captured"
    assert probe(env.pod("plain"), SERVER) == "direct"
    assert env.pods()["shop/client"]["redirected"]["outbound"] >= 1

    status = env.status()
    assert status["node"] == "node-a"
    assert status["uplink"] == "eth0"  # found through the route to the controller
    assert status["watch"]["connected"] is True
    assert {p["name"] for p in status["dataplane"]["programs"]} == {
        "pod_ingress",
        "pod_egress",
        "uplink_ingress",
    }
    assert status["dataplane"]["uplink"]["program"] is not None
    assert 0 < status["rss_bytes"] < 100 * 1024 * 1024

    table = env.veilctl("pods")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["POD", "IP", "VETH"]
    line = next(r for r in rows if r.startswith("shop/client"))
    assert line.split()[1:5] == ["10.244.1.10", client.host_veth, "yes", "enrolled"]
    as_json = json_out(env.veilctl("pods", "-o", "json"))
    assert {r["workload"] for r in as_json} == {"shop/client", "shop/other", "legacy/plain"}

    verify = env.veilctl("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "no findings" in verify.stdout
    checks = {c["name"]: c for c in json_out(env.veilctl("verify", "-o", "json"))["checks"]}
    # Read through sock_diag, marks included (the stand-in carries the ztunnel mark).
    assert checks["listeners"]["detail"] == "listening: 15001, 15006, 15008"

    status_cli = env.veilctl("status")  # the ztunnel admin address points nowhere
    assert status_cli.returncode == 3
    lines = {
        k: v.strip() for k, _, v in (ln.partition("  ") for ln in status_cli.stdout.splitlines())
    }
    assert lines["ztunnel"].startswith("UNREACHABLE") and lines["node"] == "node-a"

    maps = json_out(env.veilctl("bpf", "maps", "-o", "json"))
    assert {p["ip"] for p in maps["pods"]} == {"10.244.1.10", "10.244.1.11", "10.244.1.12"}
    source = env.veilctl("bpf", "source")
    assert "-DVEIL_OUTBOUND_PORT=15001" in source.stdout


def test_enrollment_follows_registry_labels_without_restart(agent_node: AgentNode) -> None:
    env = agent_node
    assert env.agent is not None
    pid = env.agent.pid
    client = env.pod("client")
    doc = registry_doc()

    unlabelled = copy.deepcopy(doc)
    unlabelled["namespaces"][0]["labels"] = {}
    env.write_registry(unlabelled)
    wait_pod(env, "shop/client", "tracked")
    assert probe(client, SERVER) == "direct"

    opted_out = copy.deepcopy(doc)
    opted_out["workloads"][1]["labels"] = {"veil.io/dataplane-mode": "none"}
    env.write_registry(opted_out)
    wait_pod(env, "shop/client", "enrolled")
    wait_pod(env, "shop/other", "tracked")
    assert probe(client, SERVER) == "captured"
    assert probe(env.pod("other"), SERVER) == "direct"

    env.write_registry(doc)
    wait_pod(env, "shop/other", "enrolled")
    assert env.agent is not None and env.agent.pid == pid


def test_pod_registered_before_its_veth_is_enrolled_when_it_appears(
    agent_node: AgentNode,
) -> None:
    env = agent_node
    doc = registry_doc()
    doc["workloads"].append(
        {
            "name": "late",
            "namespace": "shop",
            "serviceAccount": "late",
            "node": "node-a",
            "ips": ["10.244.1.13"],
        }
    )
    env.write_registry(doc)
    env.wait_for(
        "shop/late reported pending",
        lambda: env.pods().get("shop/late", {}).get("state", "").startswith("pending"),
    )
    late = env.topo.add_pod(env.node, "late", "10.244.1.13")
    try:
        wait_pod(env, "shop/late", "enrolled")
        assert probe(late, SERVER) == "captured"
        env.write_registry(registry_doc())
        env.wait_for("shop/late removed", lambda: "shop/late" not in env.pods())
        assert probe(late, SERVER) == "direct"
        assert late.host_veth not in veil_filters(env)
    finally:
        env.topo.remove_pod(late)


def test_kill9_leaves_redirection_and_restart_reconciles(agent_node: AgentNode) -> None:
    env = agent_node
    client = env.pod("client")
    before = veil_filters(env)
    assert before[client.host_veth] == {"ingress", "egress"}
    results: list[tuple[float, str]] = []
    stop = threading.Event()

    def loop() -> None:
        for _ in range(2000):  # bounded: ~40 s at most
            if stop.is_set():
                return
            results.append((time.monotonic(), probe(client, SERVER, timeout=0.5)))
            time.sleep(0.01)

    prober = threading.Thread(target=loop, daemon=True)
    prober.start()
    try:
        time.sleep(0.3)
        env.kill_agent(signal.SIGKILL)
        gap_start = time.monotonic()
        assert veil_filters(env) == before  # nothing detached by the kill
        # A registry change while no agent runs: the next one must apply it.
        doc = registry_doc()
        doc["workloads"][1]["labels"] = {"veil.io/dataplane-mode": "none"}
        env.write_registry(doc)
        time.sleep(1.0)
        gap_end = time.monotonic()
        env.start_agent()
        env.wait_ready()
        wait_pod(env, "shop/other", "tracked")
        time.sleep(0.3)
    finally:
        stop.set()
        prober.join(10)
    outcomes = [r for _, r in results]
    assert "direct" not in outcomes, "a connection bypassed the ztunnel"
    in_gap = [r for t, r in results if gap_start <= t <= gap_end]
    assert in_gap and set(in_gap) == {"captured"}, in_gap
    assert env.status()["load"]["reused_pins"] is True
    env.write_registry(registry_doc())
    wait_pod(env, "shop/other", "enrolled")


def test_verify_finds_a_detached_filter_and_resync_repairs_it(agent_node: AgentNode) -> None:
    env = agent_node
    client = env.pod("client")
    with in_netns(env.node.netns):
        ipr = IPRoute()
    try:
        index = ipr.link_lookup(ifname=client.host_veth)[0]
        assert tc.detach_bpf(ipr, index, Hook.EGRESS)
    finally:
        ipr.close()
    verify = env.veilctl("verify")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert "shop/client (10.244.1.10)" in verify.stdout
    assert f"egress guard program missing on {client.host_veth}" in verify.stdout
    report = json_out(env.veilctl("verify", "-o", "json"))
    assert [f["check"] for f in report["findings"]] == ["pods"]

    assert env.agent is not None
    os.killpg(env.agent.pid, signal.SIGHUP)  # reconcile now instead of at the next resync
    wait_pod(env, "shop/client", "enrolled")
    assert env.veilctl("verify").returncode == 0


def test_preflight_and_startup_failures_are_explained(agent_node: AgentNode) -> None:
    env = agent_node
    ok = env.veil("agent", "preflight", "--pin-dir", str(env.pin_dir))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [line.split()[:2] for line in ok.stdout.splitlines()[1:6]] == [
        ["privileges", "ok"],
        ["bcc", "ok"],
        ["kernel", "headers"],
        ["bpffs", "ok"],
        ["bpf_sk_assign", "ok"],
    ]

    other = str(env.work / "other.sock")
    no_join = env.veil(
        "agent", "run", "--state-dir", str(env.work / "nowhere"), "--status-socket", other
    )
    assert no_join.returncode == 1
    assert "no node credentials" in no_join.stderr and "veil node join" in no_join.stderr

    not_bpffs = env.veil(
        "agent",
        "run",
        "--state-dir",
        str(env.state_dir),
        "--pin-dir",
        "/tmp/veil-not-bpffs",
        "--status-socket",
        other,
    )
    assert not_bpffs.returncode == 1
    assert "node preflight failed" in not_bpffs.stderr
    assert "not on a bpf filesystem" in not_bpffs.stderr and "hint:" in not_bpffs.stderr
    assert "Traceback" not in not_bpffs.stderr
    # A second agent on the same socket is a rolling-update surge: it takes
    # the socket over instead of refusing (test_agent_surge.py).


def test_veilctl_reads_a_real_ztunnel(agent_node: AgentNode) -> None:
    """workloads, policies, certs, connections and status from ``veil ztunnel run``.

    The capture ports belong to the stand-in, so this ztunnel listens elsewhere;
    its admin API is the real one on 127.0.0.1:15000 of the node.
    """
    env = agent_node
    zt = env.topo.popen(
        env.node,
        veil(
            "ztunnel",
            "run",
            "--node",
            "node-a",
            "--state-dir",
            str(env.state_dir),
            "--outbound-port",
            "25001",
            "--inbound-plaintext-port",
            "25006",
            "--hbone-port",
            "25008",
            "--metrics-address",
            "127.0.0.1:25020",
            "--readiness-address",
            "127.0.0.1:25021",
        ),
        log_path=env.work / "ztunnel.log",
    )
    admin = "127.0.0.1:15000"
    try:

        def certs_valid() -> bool:
            done = env.veilctl("certs", "-o", "json", admin=admin)
            return done.returncode == 0 and sorted(
                c["identity"] for c in json.loads(done.stdout) if c["state"] == "valid"
            ) == [
                "spiffe://cluster.local/ns/shop/sa/client",
                "spiffe://cluster.local/ns/shop/sa/other",
            ]

        env.wait_for("the ztunnel's certificates", certs_valid, timeout=30.0, step=0.3)
        workloads = env.veilctl("workloads", admin=admin)
        assert workloads.returncode == 0, workloads.stderr
        names = [line.split()[0] for line in workloads.stdout.splitlines()[1:]]
        assert names == ["legacy/plain", "shop/client", "shop/other"]
        assert len(json_out(env.veilctl("workloads", "--all", "-o", "json", admin=admin))) == 4
        policies = env.veilctl("policies", admin=admin)
        assert "shop/client-only" in policies.stdout and "ALLOW" in policies.stdout
        assert "principals=cluster.local/ns/shop/sa/client; to ports=8080" in policies.stdout
        certs = env.veilctl("certs", admin=admin).stdout
        assert "spiffe://cluster.local/ns/shop/sa/client  valid" in certs
        assert env.veilctl("connections", admin=admin).stdout.strip() == "(no live connections)"
        status = env.veilctl("status", admin=admin)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "ztunnel state" in status.stdout and "synced, version" in status.stdout
    finally:
        zt.close()
    assert zt.log_text()  # it ran and logged


def test_sigterm_keeps_programs_and_uninstall_removes_everything(agent_node: AgentNode) -> None:
    env = agent_node
    client = env.pod("client")
    refused = env.veil(
        "agent", "uninstall", "--pin-dir", str(env.pin_dir), "--status-socket", str(env.socket)
    )
    assert refused.returncode == 1 and "still running" in refused.stderr

    assert env.kill_agent(signal.SIGTERM) == 0
    assert veil_filters(env)[client.host_veth] == {"ingress", "egress"}
    assert probe(client, SERVER) == "captured"  # fail closed: still steered

    down = env.veilctl("pods")
    assert down.returncode == 3 and "agent unreachable" in down.stderr

    done = env.veil(
        "agent", "uninstall", "--pin-dir", str(env.pin_dir), "--status-socket", str(env.socket)
    )
    assert done.returncode == 0, done.stderr
    removed = done.stdout
    assert f"veil_pod_egress on {client.host_veth} egress" in removed
    assert "veil_uplink_ingress on eth0 ingress" in removed
    assert "ip rule fwmark" in removed and "ip route local 0.0.0.0/0" in removed
    assert "ip -6 rule fwmark" in removed and "ip -6 route local ::/0" in removed
    assert f"pin {env.pin_dir}/prog_pod_ingress" in removed
    assert veil_filters(env) == {}
    assert not env.pin_dir.exists()
    with in_netns(env.node.netns):
        ipr = IPRoute()
    try:
        state: Any = routing.policy_routing(ipr)
    finally:
        ipr.close()
    assert (state.rule, state.route, state.rule6, state.route6) == (False, False, False, False)
    assert probe(client, SERVER) == "direct"
