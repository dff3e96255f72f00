"""The lab topology: an underlay bridge, node namespaces and pod namespaces.

Layout (every name starts with the topology prefix, so parallel runs never
collide and crashed runs are easy to find)::

    <p>-ul            bridge br0 with the controller IP (10.100.0.1/24)
      |  nXXXXXXXX    one bridge port per node
    <p>-<node>        eth0 = underlay IP + fd00:100::<n>/64, forwarding on (both families),
      |               routes: other nodes' pod CIDRs (v4 and v6) via their underlay IPs,
      |               <pod ip>/32 and <pod ip6>/128 dev vhXXXXXXXX for each local pod
    <p>-<node>-<pod>  eth0 = pod IP/32 + pod IPv6/128, default via 169.254.1.1 onlink
                      and via fe80::1; both gateways are PERMANENT neighbours = host
                      veth MAC

Dual stack: every pod also gets an IPv6 address from its node's
fd00:244:<n>::/64, with the same host part as its IPv4 address (10.244.1.5
-> fd00:244:1::5). DAD is off (addresses are usable at once, as `nodad`
gives) and nothing sends router solicitations, so captures stay quiet; the
kernel still sends MLD reports when an interface comes up. The underlay
namespace keeps IPv6 off: its bridge forwards frames of both families.

Why the static neighbour: the pod's gateway 169.254.1.1 exists nowhere, and
proxy ARP will not answer for an address the node has no route to, so the pod
is told the MAC directly (the trick Calico uses). The underlay namespace
carries routes back to the pod CIDRs only so that a controller listening on
the bridge can answer pods; it does not forward (ip_forward stays 0).

Interfaces are created directly inside their namespaces (veth peers are
placed with IFLA_NET_NS_FD), so nothing ever appears in the root namespace and
deleting the namespaces removes everything.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute

from lab import owner
from lab.errors import LabError
from lab.netns import create_netns, in_netns, remove_netns, write_sysctl
from lab.process import LabProcess, run_in_netns, wait_listening

__all__ = [
    "DEFAULT_CONTROLLER_IP",
    "POD_GATEWAY",
    "POD_GATEWAY6",
    "LabNode",
    "LabPod",
    "Topology",
]

DEFAULT_CONTROLLER_IP = "10.100.0.1"
POD_GATEWAY = "169.254.1.1"
POD_GATEWAY6 = "fe80::1"
UNDERLAY6 = ipaddress.IPv6Network("fd00:100::/64")
_NUD_PERMANENT = 0x80
_RTNH_F_ONLINK = 4


def _hash8(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _mac(seed: str) -> str:
    # Locally administered, unicast, stable for a given seed (readable captures).
    raw = hashlib.sha1(seed.encode()).digest()[:5]
    return "02:" + ":".join(f"{b:02x}" for b in raw)


@dataclass(eq=False)
class LabNode:
    """A node: a namespace with an uplink on the underlay bridge."""

    name: str
    netns: str
    underlay_ip: str
    pod_cidr: str
    uplink: str = "eth0"
    uplink_mac: str = ""
    bridge_port: str = ""
    pods: list[LabPod] = field(default_factory=list)
    underlay_ip6: str = ""
    pod_cidr6: str = ""

    def __repr__(self) -> str:
        return f"LabNode({self.name!r}, netns={self.netns!r}, underlay_ip={self.underlay_ip!r})"


@dataclass(eq=False)
class LabPod:
    """A pod: a namespace whose eth0 pairs with ``host_veth`` in its node's namespace."""

    name: str
    node: LabNode
    netns: str
    ip: str
    host_veth: str
    host_veth_mac: str
    mac: str
    ip6: str = ""

    def connect_tcp(self, ip: str, port: int, timeout: float = 3.0) -> socket.socket:
        """A TCP socket connected from inside this pod (it stays in the pod)."""
        with in_netns(self.netns):
            return socket.create_connection((ip, port), timeout=timeout)

    def __repr__(self) -> str:
        return f"LabPod({self.name!r}, node={self.node.name!r}, ip={self.ip!r})"


class Topology:
    """Builds and tears down a lab. Use as a context manager; ``close()`` is idempotent."""

    bridge = "br0"

    def __init__(
        self,
        prefix: str | None = None,
        *,
        controller_ip: str = DEFAULT_CONTROLLER_IP,
        underlay_prefixlen: int = 24,
        rp_filter: int = 1,
    ) -> None:
        self.prefix = prefix or owner.new_prefix()
        if not owner.valid_prefix(self.prefix):
            raise LabError(
                f"lab prefix {self.prefix!r} is not usable",
                hint="use 'vt' followed by 4 lowercase hex digits, e.g. 'vt1a2b'",
            )
        self.controller_ip = controller_ip
        self.rp_filter = rp_filter  # nodes' net.ipv4.conf.{all,default}.rp_filter
        self.underlay = ipaddress.ip_interface(f"{controller_ip}/{underlay_prefixlen}").network
        self.underlay_netns = f"{self.prefix}-ul"
        self.nodes: dict[str, LabNode] = {}
        self._created_netns: list[str] = []
        self._processes: list[LabProcess] = []
        self._built = False
        self._closed = False

    # -- declaration -------------------------------------------------------

    def add_node(
        self, name: str, underlay_ip: str | None = None, pod_cidr: str | None = None
    ) -> LabNode:
        """Declare a node (built by build(), or at once if the topology is built)."""
        self._check_open()
        if name in self.nodes or not name or "/" in name or name == "ul":
            raise LabError(
                f"node name {name!r} is empty, invalid or already used",
                hint="use a unique name such as 'node-a' ('ul' names the underlay)",
            )
        index = len(self.nodes)
        ip = underlay_ip or str(self.underlay.network_address + 11 + index)
        if ipaddress.ip_address(ip) not in self.underlay:
            raise LabError(f"node {name}: underlay IP {ip} is outside {self.underlay}")
        cidr = str(ipaddress.ip_network(pod_cidr or f"10.244.{index + 1}.0/24"))
        node = LabNode(
            underlay_ip6=str(UNDERLAY6.network_address + 11 + index),
            pod_cidr6=f"fd00:244:{index + 1:x}::/64",
            name=name,
            netns=f"{self.prefix}-{name}",
            underlay_ip=ip,
            pod_cidr=cidr,
            uplink_mac=_mac(f"{self.prefix}/{name}/uplink"),
            bridge_port=f"n{_hash8(name)}",
        )
        self.nodes[name] = node
        if self._built:
            self._build_node(node)
            self._build_routes()
        return node

    def add_pod(self, node: LabNode | str, name: str, ip: str | None = None) -> LabPod:
        """Declare a pod on ``node``; ``ip`` defaults to the next free address in its CIDR."""
        self._check_open()
        lab_node = self.node(node) if isinstance(node, str) else node
        if any(p.name == name for p in lab_node.pods) or not name or "/" in name:
            raise LabError(f"pod name {name!r} on node {lab_node.name} is invalid or used")
        cidr = ipaddress.ip_network(lab_node.pod_cidr)
        if ip is None:
            used = {p.ip for p in lab_node.pods}
            free = (str(h) for h in list(cidr.hosts())[1:] if str(h) not in used)
            ip = next(free, None)
            if ip is None:
                raise LabError(
                    f"no free address left in node {lab_node.name}'s pod CIDR {cidr}",
                    hint="give the node a larger pod_cidr",
                )
        if ipaddress.ip_address(ip) not in cidr:
            raise LabError(
                f"pod {name}: IP {ip} is outside node {lab_node.name}'s pod CIDR {cidr}",
                hint="pods are routed by their node's CIDR; pick an address inside it",
            )
        host_part = int(ipaddress.ip_address(ip)) - int(cidr.network_address)
        pod = LabPod(
            ip6=str(ipaddress.IPv6Network(lab_node.pod_cidr6).network_address + host_part),
            name=name,
            node=lab_node,
            netns=f"{lab_node.netns}-{name}",
            ip=ip,
            host_veth=f"vh{_hash8(name)}",
            host_veth_mac=_mac(f"{self.prefix}/{lab_node.name}/{name}/host"),
            mac=_mac(f"{self.prefix}/{lab_node.name}/{name}/pod"),
        )
        lab_node.pods.append(pod)
        if self._built:
            self._build_pod(pod)
        return pod

    def remove_pod(self, pod: LabPod) -> None:
        """Delete a pod: its processes, its veth pair (and so the node's route), its netns."""
        self._check_open()
        if pod not in pod.node.pods:
            raise LabError(f"pod {pod.name} is not on node {pod.node.name} any more")
        pod.node.pods.remove(pod)
        if pod.netns not in self._created_netns:
            return  # declared but never built
        for proc in [p for p in self._processes if p.netns == pod.netns]:
            proc.close()
            self._processes.remove(proc)
        owner.kill_netns_processes(pod.netns)
        with _rtnl(pod.node.netns) as ipr:
            for index in ipr.link_lookup(ifname=pod.host_veth):
                ipr.link("del", index=index)
        remove_netns(pod.netns)
        self._created_netns.remove(pod.netns)

    def node(self, name: str) -> LabNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r} in topology {self.prefix}") from None

    def pod(self, name: str, node: str | None = None) -> LabPod:
        """Find a pod by name (optionally on one node)."""
        hits = [p for n in self.nodes.values() for p in n.pods if p.name == name]
        if node is not None:
            hits = [p for p in hits if p.node.name == node]
        if len(hits) != 1:
            raise LabError(f"{len(hits)} pods named {name!r} in topology {self.prefix}")
        return hits[0]

    @property
    def pods(self) -> list[LabPod]:
        return [p for n in self.nodes.values() for p in n.pods]

    # -- building ----------------------------------------------------------

    def build(self) -> Topology:
        """Create every declared namespace, link, address, route and neighbour."""
        self._check_open()
        if self._built:
            return self
        owner.claim(self.prefix)
        try:
            self._build_underlay()
            for node in self.nodes.values():
                self._build_node(node)
            self._build_routes()
            for pod in self.pods:
                self._build_pod(pod)
        except BaseException:
            self.close()
            raise
        self._built = True
        return self

    def _new_netns(self, name: str, *, ipv6: bool = True) -> None:
        create_netns(name)
        self._created_netns.append(name)
        with in_netns(name):
            # "default" must be set before links are created. With IPv6: no DAD
            # (addresses usable at once, like `nodad`), no router solicitations
            # and no autoconfiguration from advertisements (addresses are static).
            if not ipv6:
                write_sysctl("net.ipv6.conf.all.disable_ipv6", 1)
                write_sysctl("net.ipv6.conf.default.disable_ipv6", 1)
                return
            for conf in ("all", "default"):
                write_sysctl(f"net.ipv6.conf.{conf}.accept_dad", 0)
                write_sysctl(f"net.ipv6.conf.{conf}.router_solicitations", 0)
                write_sysctl(f"net.ipv6.conf.{conf}.accept_ra", 0)

    def _build_underlay(self) -> None:
        ns = self.underlay_netns
        self._new_netns(ns, ipv6=False)
        with _rtnl(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            # A fixed MAC: a bridge otherwise takes its lowest port's, which
            # changes as nodes join and leaves stale ARP entries for the controller.
            ipr.link(
                "add",
                ifname=self.bridge,
                kind="bridge",
                address=_mac(f"{self.prefix}/bridge"),
                br_stp_state=0,
                br_forward_delay=0,
                # Flood multicast: with IPv6 off here the bridge sends no MLD
                # queries, and snooping could then starve neighbour solicitations.
                br_mcast_snooping=0,
            )
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=br, address=self.controller_ip, prefixlen=self.underlay.prefixlen)
            ipr.link("set", index=br, state="up")

    def _build_node(self, node: LabNode) -> None:
        self._new_netns(node.netns)
        with in_netns(node.netns):
            write_sysctl("net.ipv4.ip_forward", 1)
            write_sysctl("net.ipv6.conf.all.forwarding", 1)
            # Reverse-path filtering defaults to strict, as on many production
            # nodes: every steered path (tproxy/sk_assign to the ztunnel, replies
            # to its spoofed-source sockets) validates the packet's *source*,
            # which is always routed back through the interface it came in on,
            # so strict mode holds and tests prove it (test_lab_tproxy runs
            # under it). accept_local and route_localnet stay at their kernel
            # defaults (off): no steered packet carries a node-local source and
            # nothing is redirected to 127.0.0.1. A stock node is the point: the
            # agent must configure what it needs itself, not lean on the lab.
            for conf in ("all", "default"):
                write_sysctl(f"net.ipv4.conf.{conf}.rp_filter", self.rp_filter)
        fd = os.open(f"/run/netns/{node.netns}", os.O_RDONLY)
        try:
            with _rtnl(self.underlay_netns) as ipr:
                ipr.link(
                    "add",
                    ifname=node.bridge_port,
                    kind="veth",
                    peer={"ifname": node.uplink, "address": node.uplink_mac, "net_ns_fd": fd},
                )
                port = ipr.link_lookup(ifname=node.bridge_port)[0]
                br = ipr.link_lookup(ifname=self.bridge)[0]
                ipr.link("set", index=port, master=br, state="up")
        finally:
            os.close(fd)
        with _rtnl(node.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            up = ipr.link_lookup(ifname=node.uplink)[0]
            ipr.addr("add", index=up, address=node.underlay_ip, prefixlen=self.underlay.prefixlen)
            ipr.addr("add", index=up, address=node.underlay_ip6, prefixlen=UNDERLAY6.prefixlen)
            ipr.link("set", index=up, state="up")

    def _build_routes(self) -> None:
        """Pod CIDR routes between nodes, and from the underlay back to pods (replace = idempotent)."""
        with _rtnl(self.underlay_netns) as ipr:
            for node in self.nodes.values():
                ipr.route("replace", dst=node.pod_cidr, gateway=node.underlay_ip)
        for node in self.nodes.values():
            with _rtnl(node.netns) as ipr:
                for other in self.nodes.values():
                    if other is not node:
                        ipr.route("replace", dst=other.pod_cidr, gateway=other.underlay_ip)
                        ipr.route(
                            "replace",
                            family=socket.AF_INET6,
                            dst=other.pod_cidr6,
                            gateway=other.underlay_ip6,
                        )

    def _build_pod(self, pod: LabPod) -> None:
        self._new_netns(pod.netns)
        fd = os.open(f"/run/netns/{pod.netns}", os.O_RDONLY)
        try:
            with _rtnl(pod.node.netns) as ipr:
                ipr.link(
                    "add",
                    ifname=pod.host_veth,
                    kind="veth",
                    address=pod.host_veth_mac,
                    peer={"ifname": "eth0", "address": pod.mac, "net_ns_fd": fd},
                )
                host = ipr.link_lookup(ifname=pod.host_veth)[0]
                ipr.link("set", index=host, state="up")
                ipr.route("replace", dst=f"{pod.ip}/32", oif=host, scope=253)  # scope link
                ipr.route("replace", family=socket.AF_INET6, dst=f"{pod.ip6}/128", oif=host)
        finally:
            os.close(fd)
        with _rtnl(pod.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=pod.ip, prefixlen=32)
            ipr.link("set", index=eth0, state="up")
            ipr.neigh(
                "add",
                dst=POD_GATEWAY,
                lladdr=pod.host_veth_mac,
                ifindex=eth0,
                state=_NUD_PERMANENT,
            )
            ipr.route("add", dst="0.0.0.0/0", gateway=POD_GATEWAY, oif=eth0, flags=_RTNH_F_ONLINK)
            ipr.addr("add", index=eth0, address=pod.ip6, prefixlen=128)
            ipr.neigh(
                "add",
                family=socket.AF_INET6,
                dst=POD_GATEWAY6,
                lladdr=pod.host_veth_mac,
                ifindex=eth0,
                state=_NUD_PERMANENT,
            )
            ipr.route("add", family=socket.AF_INET6, dst="::/0", gateway=POD_GATEWAY6, oif=eth0)

    # -- processes ---------------------------------------------------------

    def popen(
        self,
        netns: str | LabNode | LabPod,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> LabProcess:
        """Start ``argv`` inside a namespace; close() (or topology close) stops it."""
        self._check_open()
        proc = LabProcess(
            _ns(netns), argv, env=env, log_path=log_path, cwd=cwd, stop_signal=stop_signal
        )
        self._processes.append(proc)
        return proc

    def run(
        self,
        netns: str | LabNode | LabPod,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` to completion inside a namespace; LabError if it fails."""
        self._check_open()
        return run_in_netns(_ns(netns), argv, input=input, timeout=timeout)

    def start_app(
        self,
        netns: str | LabNode | LabPod,
        app: str,
        port: int,
        *extra: str,
        log_path: Path | None = None,
        timeout: float = 10.0,
    ) -> LabProcess:
        """Run lab app ``app`` (see lab.apps) as a process; return once it listens."""
        from lab.apps import app_argv

        proc = self.popen(netns, app_argv(app, port, *extra), log_path=log_path)
        try:
            wait_listening(proc, port, timeout)
        except BaseException:
            proc.close()
            raise
        return proc

    # -- teardown ----------------------------------------------------------

    def close(self) -> None:
        """Stop tracked processes and delete every namespace this topology made."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for proc in reversed(self._processes):
            try:
                proc.close()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"{proc}: {exc}")
        self._processes.clear()
        # Pods first, underlay last: the reverse of creation.
        for name in reversed(self._created_netns):
            try:
                owner.kill_netns_processes(name)
                remove_netns(name)
            except Exception as exc:
                errors.append(f"{name}: {exc}")
        self._created_netns.clear()
        owner.release(self.prefix)
        if errors:
            raise LabError(
                f"lab {self.prefix} teardown left problems: {'; '.join(errors)}",
                hint="run lab.cleanup_stale() as root to remove leftovers",
            )

    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"topology {self.prefix} is closed", hint="build a new Topology")

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Topology({self.prefix!r}, nodes={list(self.nodes)})"

    @classmethod
    def standard(
        cls, nodes: int = 2, pods_per_node: int = 3, prefix: str | None = None
    ) -> Topology:
        """A built topology: nodes node-a, node-b, ... each with pods pod-0, pod-1, ..."""
        topo = cls(prefix)
        try:
            for i in range(nodes):
                node = topo.add_node(f"node-{chr(ord('a') + i)}")
                for j in range(pods_per_node):
                    topo.add_pod(node, f"pod-{j}")
            return topo.build()
        except BaseException:
            topo.close()
            raise


def _ns(target: str | LabNode | LabPod) -> str:
    return target if isinstance(target, str) else target.netns


class _rtnl:
    """An rtnetlink socket opened inside a namespace, closed on exit."""

    def __init__(self, netns: str) -> None:
        self.netns = netns

    def __enter__(self) -> Any:
        with in_netns(self.netns):
            self.ipr = IPRoute(groups=0)
        return self.ipr

    def __exit__(self, *exc: object) -> None:
        self.ipr.close()
