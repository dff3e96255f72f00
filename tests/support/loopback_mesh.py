"""The loopback mesh the proxy tests share: addresses, registry, nodes, an app.

Pods are 127.0.x.y addresses (all local); each node's in-process ztunnel binds
its listeners to the address of the pod it serves in the test, on
kernel-chosen ports. Fixtures using these live in
``tests/integration/ztunnel_proxy/conftest.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.api.spiffe import SpiffeId, workload_identity
from tests.support.controller import ControllerProcess, veil_argv
from tests.support.registry_docs import allow_from, mesh_doc, peer_auth, workload
from ztunnel.app import Ztunnel
from ztunnel.config import ZtunnelConfig
from ztunnel.hbone import HboneStream, relay

__all__ = [
    "CHECKOUT",
    "CHECKOUT_IP",
    "LEGACY_IP",
    "OTHER",
    "OTHER_IP",
    "PAYMENTS",
    "PAYMENTS_IP",
    "AccessLog",
    "App",
    "Mesh",
    "Tunnel",
    "default_doc",
    "node_config",
    "open_tunnel",
    "start_app",
    "ztunnel_ports",
    "ztunnel_run_argv",
]

CHECKOUT_IP = "127.0.10.1"
OTHER_IP = "127.0.10.2"
PAYMENTS_IP = "127.0.20.1"
LEGACY_IP = "127.0.30.1"
CHECKOUT = workload_identity("cluster.local", "shop", "checkout")
OTHER = workload_identity("cluster.local", "shop", "other")
PAYMENTS = workload_identity("cluster.local", "shop", "payments")


def default_doc() -> dict[str, Any]:
    """checkout and other on node-a, payments on node-b; only checkout may call
    payments; shop is STRICT."""
    return mesh_doc(
        [
            workload("checkout", "shop", "node-a", CHECKOUT_IP),
            workload("other", "shop", "node-a", OTHER_IP),
            workload("payments", "shop", "node-b", PAYMENTS_IP),
            workload("legacy-client", "legacy", "node-a", LEGACY_IP, sa="default"),
        ],
        policies=[
            allow_from("payments-allow-checkout", "payments", ["cluster.local/ns/shop/sa/checkout"])
        ],
        peer_auths=[peer_auth("STRICT")],
    )


def node_config(name: str, state_dir: Path, listen: str, **overrides: Any) -> ZtunnelConfig:
    values: dict[str, Any] = {
        "node_name": name,
        "state_dir": state_dir,
        "listen_address": listen,
        "outbound_port": 0,
        "inbound_plaintext_port": 0,
        "hbone_port": 0,
        "admin_address": ("127.0.0.1", 0),
        "metrics_address": ("127.0.0.1", 0),
        "readiness_address": ("127.0.0.1", 0),
        "drain_grace_period": 2.0,
        "connect_timeout": 5.0,
        "xds_backoff_initial": 0.2,
        "xds_backoff_max": 1.0,
        "cert_retry_initial": 0.2,
        "cert_retry_max": 1.0,
    }
    values.update(overrides)
    return ZtunnelConfig(**values)


class Mesh:
    """The controller and the nodes' in-process ztunnels."""

    def __init__(self, controller: ControllerProcess, work: Path) -> None:
        self.controller = controller
        self.work = work
        self.nodes: dict[str, Ztunnel] = {}

    async def start_node(self, name: str, listen: str, **overrides: Any) -> Ztunnel:
        state = self.work / f"{name}-state"
        await self.controller.join(name, state)
        zt = Ztunnel(node_config(name, state, listen, **overrides))
        self.nodes[name] = zt
        await zt.start(sync_timeout=15)
        return zt

    async def start_pair(self) -> tuple[Ztunnel, Ztunnel]:
        """node-a (checkout's node) and node-b (payments' node)."""
        return (
            await self.start_node("node-a", CHECKOUT_IP),
            await self.start_node("node-b", PAYMENTS_IP),
        )

    async def close(self) -> None:
        for zt in self.nodes.values():
            await zt.shutdown(grace=0.5)


class AccessLog(logging.Handler):
    """Collects the ``veil.access`` JSON lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class App:
    """A TCP app on the payments IP: says who called it, then echoes."""

    server: asyncio.Server
    port: int
    peers: list[str]


async def start_app() -> App:
    peers: list[str] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = w.get_extra_info("peername")[0]
        peers.append(peer)
        w.write(f"peer {peer}\n".encode())
        try:
            while chunk := await r.read(1 << 16):
                w.write(chunk)
                await w.drain()
            w.write_eof()
        except ConnectionError:
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, PAYMENTS_IP, 0)
    return App(server, server.sockets[0].getsockname()[1], peers)


@dataclass
class Tunnel:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task[Any]
    stream: HboneStream


async def open_tunnel(
    node_a: Ztunnel,
    node_b: Ztunnel,
    app_port: int,
    identity: SpiffeId = CHECKOUT,
    forwarded: tuple[str, int] | None = (CHECKOUT_IP, 40000),
) -> Tunnel:
    """What node-a's outbound path does for a captured connection, minus the
    capture (which needs the node's steering; see tests/netns/ztunnel)."""
    cert = await node_a.certs.fetch(identity, timeout=10)
    stream = await node_a.pool.open_stream(
        cert,
        PAYMENTS_IP,
        node_b.address("hbone")[1],
        PAYMENTS,
        (PAYMENTS_IP, app_port),
        forwarded_for=forwarded,
    )
    mine, theirs = socket.socketpair()
    task = asyncio.create_task(relay(stream, theirs))
    reader, writer = await asyncio.open_connection(sock=mine)
    return Tunnel(reader, writer, task, stream)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ztunnel_ports(listen: str) -> dict[str, int]:
    """Free ports for a ``veil ztunnel run`` process: its listeners on ``listen``,
    admin, metrics and readiness on 127.0.0.1."""
    return {
        "hbone": _free_port(listen),
        "plain": _free_port(listen),
        "out": _free_port(listen),
        "admin": _free_port("127.0.0.1"),
        "metrics": _free_port("127.0.0.1"),
        "ready": _free_port("127.0.0.1"),
    }


def ztunnel_run_argv(
    node: str, state: Path, listen: str, ports: dict[str, int], grace: float, *extra: str
) -> list[str]:
    """``veil ztunnel run`` for ``node`` on the ports of :func:`ztunnel_ports`."""
    return veil_argv(
        "ztunnel", "run",
        "--node", node,
        "--state-dir", str(state),
        "--listen-address", listen,
        "--hbone-port", str(ports["hbone"]),
        "--inbound-plaintext-port", str(ports["plain"]),
        "--outbound-port", str(ports["out"]),
        "--admin-address", f"127.0.0.1:{ports['admin']}",
        "--metrics-address", f"127.0.0.1:{ports['metrics']}",
        "--readiness-address", f"127.0.0.1:{ports['ready']}",
        "--drain-grace-period", f"{grace}s",
        *extra,
    )  # fmt: skip
