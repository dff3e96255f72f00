"""ControllerChannel against the controller's real DiscoveryHub and IdentityService, in process.

``Controller`` stands for one controller process: its clients do what the gRPC
adapters in controller.service do after mTLS, minus the transport, and while
``down`` is set every call fails the way controller.api.client reports an
unreachable controller (ApiError UNAVAILABLE), and its port does not answer.
The real transport and a real outage are covered by tests/netns/ztunnel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import timedelta
from pathlib import Path

import pytest

from controller.api.errors import ApiError
from controller.api.model import RegistryState, ResourceType, WatchUpdate, Workload
from controller.api.spiffe import SpiffeId, node_identity
from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from controller.discovery import DiscoveryHub
from controller.identity import IdentityService
from node import NodeCredentials, build_csr, generate_key, key_pem, save_node_credentials
from node.backoff import Backoff
from node.channel import ControllerChannel
from node.state import StateStore
from node.watch import WatchClient

NODE = "node-a"


def _unreachable(what: str) -> ApiError:
    return ApiError("UNAVAILABLE", f"{what}: controller unreachable (connection refused)")


class Controller:
    def __init__(self, tmp: Path) -> None:
        self.ca = CertificateAuthority.load_or_create(tmp / "ca")
        self.registry = RegistryState(
            workloads=(Workload("a", "default", "alpha", NODE, ("10.0.1.1",), enrolled=True),)
        )
        self.hub = DiscoveryHub()
        self.hub.publish(self.registry)
        self.hub.set_trust_bundle(self.ca.trust_bundle())
        self.identity = IdentityService(
            self.ca,
            JoinTokenStore(tmp / "ca"),
            lambda: self.registry,
            default_ttl=timedelta(hours=1),
            max_ttl=timedelta(hours=24),
        )
        self.down = False
        self.opened: list[Client] = []

    def connect(self, creds: NodeCredentials, address: str) -> Client:
        client = Client(self, creds)
        self.opened.append(client)
        return client

    async def port_answers(self, address: str, timeout: float) -> bool:
        return not self.down

    def creds(self) -> NodeCredentials:
        key = generate_key()
        ident = node_identity("cluster.local", NODE)
        chain = self.ca.sign_csr(build_csr(key, ident), ident, timedelta(hours=1))
        return NodeCredentials(
            node=NODE,
            trust_domain="cluster.local",
            controller_address="127.0.0.1:15012",
            join_address="127.0.0.1:15013",
            key_pem=key_pem(key),
            cert_chain_pem=chain,
            trust_bundle_pem=self.ca.trust_bundle().roots,
        )


class Client:
    def __init__(self, controller: Controller, creds: NodeCredentials) -> None:
        self.controller = controller
        self.creds = creds
        self.closed = False

    async def create_certificate(
        self, csr_pem: bytes, identity: str, ttl_seconds: int = 0, timeout: float = 10.0
    ) -> tuple[bytes, ...]:
        if self.controller.down or self.closed:
            raise _unreachable("certificate refused")
        return await self.controller.identity.create_certificate(
            NODE, csr_pem, identity, ttl_seconds
        )

    async def watch(
        self, node: str = "", types: Iterable[ResourceType] = (), epoch: str = "", version: int = 0
    ) -> AsyncIterator[WatchUpdate]:
        if self.controller.down or self.closed:
            raise _unreachable("watch failed")
        sub = self.controller.hub.subscribe(node, frozenset(types), epoch, version)
        try:
            while True:
                if self.controller.down or self.closed:
                    raise _unreachable("watch failed")
                try:
                    yield await asyncio.wait_for(sub.next(), 0.02)
                except TimeoutError:
                    continue
        finally:
            sub.close()

    async def close(self) -> None:
        self.closed = True


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    return Controller(tmp_path)


def channel(
    controller: Controller, state_dir: Path, creds: NodeCredentials | None = None, **kw: object
) -> ControllerChannel:
    return ControllerChannel(
        state_dir,
        creds or controller.creds(),
        connect=controller.connect,
        port_answers=controller.port_answers,
        probe_interval=0.01,
        **kw,  # type: ignore[arg-type]
    )


async def test_outage_end_reopens_signals_and_wakes_the_watch_backoff(
    controller: Controller, tmp_path: Path
) -> None:
    ch = channel(controller, tmp_path)
    store = StateStore(NODE, "cluster.local")
    # A 60 s retry delay: only the reconnection signal can bring the watch back in time.
    watch = WatchClient(ch, store, backoff=Backoff(60.0, 60.0), sleep=ch.sleep)
    signals: list[int] = []
    ch.on_reconnect(lambda: signals.append(ch.reconnects))
    task = asyncio.create_task(watch.run())
    try:
        await until(lambda: watch.status().connected, "the first watch")
        controller.down = True
        await until(lambda: not ch.reachable, "the outage to be noticed")
        assert not watch.status().connected
        opened = len(controller.opened)
        await asyncio.sleep(0.1)  # probing while down: no reconnect, no new client
        assert signals == [] and len(controller.opened) == opened
        controller.down = False
        await until(lambda: watch.status().connected, "the watch to come back", timeout=3.0)
        assert signals == [1] and ch.reachable
        assert len(controller.opened) == opened + 1  # a fresh client, not gRPC's backoff
        assert controller.opened[-2].closed
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ch.close()


async def test_refusals_are_not_outages(controller: Controller, tmp_path: Path) -> None:
    ch = channel(controller, tmp_path)
    try:
        with pytest.raises(ApiError, match=r"PERMISSION_DENIED|INVALID_ARGUMENT|may not"):
            await ch.create_certificate(b"not a csr", "spiffe://cluster.local/ns/x/sa/y")
        assert ch.reachable and ch.reconnects == 0
    finally:
        await ch.close()


async def test_certificate_failure_starts_the_probe(controller: Controller, tmp_path: Path) -> None:
    ch = channel(controller, tmp_path)
    signals: list[int] = []
    ch.on_reconnect(lambda: signals.append(1))
    try:
        controller.down = True
        with pytest.raises(ApiError, match="UNAVAILABLE"):
            await ch.create_certificate(b"csr", "spiffe://cluster.local/ns/default/sa/alpha")
        assert not ch.reachable
        controller.down = False
        await until(lambda: signals == [1], "the reconnection signal")
        key = generate_key()
        sid = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/alpha")
        chain = await ch.create_certificate(build_csr(key, sid), str(sid))
        assert len(chain) >= 1
    finally:
        await ch.close()


async def test_sleep_runs_its_course_without_a_signal(
    controller: Controller, tmp_path: Path
) -> None:
    ch = channel(controller, tmp_path)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await ch.sleep(0.05)
        assert loop.time() - start >= 0.045
    finally:
        await ch.close()


async def test_changed_credentials_on_disk_reopen_the_client(
    controller: Controller, tmp_path: Path
) -> None:
    state = tmp_path / "node"
    first = controller.creds()
    save_node_credentials(state, first)
    ch = channel(controller, state, first)
    try:
        assert await ch.reload() is False  # unchanged: the same client
        assert len(controller.opened) == 1
        renewed = controller.creds()
        save_node_credentials(state, renewed)
        assert await ch.reload() is True
        assert ch.creds == renewed and len(controller.opened) == 2
        assert controller.opened[0].closed and ch.client is controller.opened[1]
        assert controller.opened[1].creds == renewed
        # Unreadable credentials keep the channel as it is.
        (state / "node-key.pem").write_bytes(key_pem(generate_key()))
        assert await ch.reload() is False and ch.client is controller.opened[1]
    finally:
        await ch.close()
