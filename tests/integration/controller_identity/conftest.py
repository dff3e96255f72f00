"""A real controller identity endpoint on loopback for the integration tests.

One ``grpc.aio`` server with the real IdentityService and Discovery hub, on two
ephemeral 127.0.0.1 ports like the production controller: the join listener
(server TLS) and the main listener (mutual TLS, client certificate required,
client roots = the live trust bundle, so rotations take effect).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.api.model import RegistryState, TrustBundle, Workload
from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from controller.discovery import DiscoveryHub
from controller.identity import IdentityService
from controller.registry import RegistryHolder
from controller.service import add_services

TD = "cluster.local"
REPO = Path(__file__).resolve().parents[3]

REGISTRY = RegistryState(
    trust_domain=TD,
    workloads=(
        Workload("cart-1", "shop", "cart", "node-1", ("10.1.0.5",), enrolled=True),
        Workload("pay-1", "shop", "payments", "node-2", ("10.2.0.5",), enrolled=True),
    ),
)


class MutableClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self.frozen = False

    def __call__(self) -> datetime:
        return self.now if self.frozen else datetime.now(UTC)

    def set(self, when: datetime) -> None:
        self.frozen = True
        self.now = when


@dataclass
class Controller:
    state_dir: Path
    ca: CertificateAuthority
    tokens: JoinTokenStore
    registry: RegistryHolder
    identity: IdentityService
    join_address: str
    mtls_address: str
    clock: MutableClock


async def start_controller(
    state_dir: Path, registry: RegistryState = REGISTRY, **ca_kwargs: Any
) -> tuple[Controller, grpc.aio.Server]:
    clock = MutableClock()
    ca = CertificateAuthority.load_or_create(state_dir, TD, clock=clock, **ca_kwargs)
    tokens = JoinTokenStore(state_dir, ca_fingerprint=lambda: ca.fingerprint)
    holder = RegistryHolder(registry, trust_domain=TD)
    hub = DiscoveryHub()
    hub.publish(registry)
    hub.set_trust_bundle(ca.trust_bundle())
    ca.add_listener(hub.set_trust_bundle)
    identity = IdentityService(ca, tokens, holder.current, max_ttl=timedelta(hours=48))
    server = grpc.aio.server()
    add_services(server, identity, hub)
    key, chain = ca.issue_serving_certificate(
        ["veil-controller"], ["127.0.0.1"], timedelta(hours=1)
    )
    # The join listener follows the active root at once, so tokens created after
    # a rotation (which pin the new root) work; the main listener keeps its
    # certificate, so nodes that have not yet learnt the new root still connect.
    join_fp = [ca.fingerprint]

    def join_config() -> Any:
        if ca.fingerprint == join_fp[0]:
            return None
        join_fp[0] = ca.fingerprint
        k, c = ca.issue_serving_certificate(["veil-controller"], ["127.0.0.1"], timedelta(hours=1))
        return grpc.ssl_server_certificate_configuration([(k, c)])

    join_creds = grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([(key, chain)]), join_config
    )
    join_port = server.add_secure_port("127.0.0.1:0", join_creds)
    served: list[TrustBundle] = [ca.trust_bundle()]

    def client_roots() -> Any:
        # Called by gRPC for new handshakes: hand over the current bundle when it changed.
        bundle = ca.trust_bundle()
        if bundle == served[0]:
            return None
        served[0] = bundle
        return grpc.ssl_server_certificate_configuration([(key, chain)], b"".join(bundle.roots))

    mtls = grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([(key, chain)], b"".join(served[0].roots)),
        client_roots,
        require_client_authentication=True,
    )
    mtls_port = server.add_secure_port("127.0.0.1:0", mtls)
    await server.start()
    ctl = Controller(
        state_dir=state_dir,
        ca=ca,
        tokens=tokens,
        registry=holder,
        identity=identity,
        join_address=f"127.0.0.1:{join_port}",
        mtls_address=f"127.0.0.1:{mtls_port}",
        clock=clock,
    )
    return ctl, server


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    ctl, server = await start_controller(tmp_path / "controller")
    try:
        yield ctl
    finally:
        await server.stop(grace=None)


def veil(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs the real ``veil`` CLI in a subprocess (blocking; use ``await asyncio.to_thread``)."""
    return subprocess.run(
        [sys.executable, "-m", "cli.veil", "--log-level", "warning", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def veil_cli() -> Any:
    return veil


@pytest.fixture
async def controller_factory() -> AsyncIterator[Any]:
    """``await factory(state_dir, **ca_kwargs)`` starts another controller, stopped at the end."""
    servers: list[grpc.aio.Server] = []

    async def factory(state_dir: Path, **kwargs: Any) -> Controller:
        ctl, server = await start_controller(state_dir, **kwargs)
        servers.append(server)
        return ctl

    try:
        yield factory
    finally:
        for server in servers:
            await server.stop(grace=None)
