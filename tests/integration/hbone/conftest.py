"""Loopback fixtures for the HBONE tests: a test CA, SVIDs, an HBONE server and client.

Every test runs on uvloop (the ztunnel's loop); modules that set
``BOTH_LOOPS = True`` run on the standard asyncio loop too. Certificates are
made here with ``cryptography`` so tests can also build the broken ones a real
CA would never issue (several URI SANs, a CA leaf, expired).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from ztunnel.hbone import (
    HboneClientPool,
    HboneConfig,
    HboneServer,
    InboundStream,
    default_connect,
    relay,
)
from ztunnel.identity.certificate import WorkloadCertificate

TD = "cluster.local"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if getattr(module, "BOTH_LOOPS", False):
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _leaf_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}")


@dataclass
class Ca:
    """A test root CA that issues SVIDs (and deliberately broken certificates)."""

    trust_domain: str = TD
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        now = datetime.now(UTC)
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"test root {self.trust_domain}")]
        )
        pub = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def root_pem(self) -> bytes:
        return _pem(self.cert)

    def bundle(self, *extra_roots: bytes) -> TrustBundle:
        return TrustBundle(self.trust_domain, (self.root_pem, *extra_roots))

    def issue(
        self,
        identity: str,
        *,
        uris: Sequence[str] | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        ca_leaf: bool = False,
        key_type: str = "p256",
    ) -> WorkloadCertificate:
        """An SVID for ``identity``; ``uris`` overrides the URI SANs (zero or several),
        ``key_type`` the leaf key (``p256``, ``p384`` or ``rsa2048``)."""
        now = datetime.now(UTC)
        nb = not_before or now - timedelta(minutes=5)
        na = not_after or now + timedelta(hours=1)
        key = _leaf_key(key_type)
        pub = key.public_key()
        names = [
            x509.UniformResourceIdentifier(u) for u in (uris if uris is not None else [identity])
        ]
        # SVIDs have an empty subject; a SAN-less certificate needs a name instead.
        subject = x509.Name([] if names else [x509.NameAttribute(NameOID.COMMON_NAME, "no-san")])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=ca_leaf, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, ca_leaf, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return WorkloadCertificate(
            identity=SpiffeId.parse(identity)
            if identity.startswith("spiffe://")
            else SpiffeId(TD, "/x"),
            key_pem=key_pem,
            chain_pem=(_pem(cert),),
            not_before=nb,
            not_after=na,
            serial=cert.serial_number,
        )


@pytest.fixture(scope="session")
def ca() -> Ca:
    return Ca()


CLIENT_ID = SpiffeId(TD, "/ns/default/sa/client")
SERVER_ID = SpiffeId(TD, "/ns/default/sa/server")


@pytest.fixture(scope="session")
def client_cert(ca: Ca) -> WorkloadCertificate:
    return ca.issue(str(CLIENT_ID))


@pytest.fixture(scope="session")
def server_cert(ca: Ca) -> WorkloadCertificate:
    return ca.issue(str(SERVER_ID))


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 18):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP echo server on 127.0.0.1; EOF from the client is echoed as EOF."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


@dataclass
class Policy:
    """What the test server's handler decides (the real policy engine is not ours)."""

    deny: set[SpiffeId] = field(default_factory=set)
    seen: list[InboundStream] = field(default_factory=list)
    results: list[object] = field(default_factory=list)


class HboneHarness:
    """An HBONE server listening on 127.0.0.1 with an accept loop, and a client pool."""

    def __init__(self, ca: Ca, server_cert: WorkloadCertificate, config: HboneConfig) -> None:
        self.ca = ca
        self.server_cert = server_cert
        self.config = config
        self.policy = Policy()
        self.server = HboneServer(
            lambda ip: self.server_cert if ip == "127.0.0.1" else None,
            lambda: ca.bundle(),
            self.handle,
            config=config,
        )
        self.pool = HboneClientPool(lambda: ca.bundle(), config=config)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.lsock.setblocking(False)
        self.port: int = self.lsock.getsockname()[1]
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, stream: InboundStream) -> None:
        self.policy.seen.append(stream)
        if stream.request.peer_identity in self.policy.deny:
            stream.reject(401, "denied")
            return
        try:
            sock = await default_connect(stream.request.host, stream.request.port)
        except OSError:
            stream.reject(503, "unreachable")
            return
        self.policy.results.append(await relay(stream, sock))

    async def accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.lsock)
            task = loop.create_task(self.server.serve_connection(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await self.pool.shutdown(grace=0.5)
        await self.server.shutdown(grace=0.5)
        for task in list(self._tasks):
            task.cancel()
        self.lsock.close()


@pytest.fixture
def hbone_config() -> HboneConfig:
    return HboneConfig()


@pytest.fixture
async def harness(
    ca: Ca, server_cert: WorkloadCertificate, hbone_config: HboneConfig
) -> AsyncIterator[HboneHarness]:
    h = HboneHarness(ca, server_cert, hbone_config)
    accept = asyncio.get_running_loop().create_task(h.accept_loop())
    try:
        yield h
    finally:
        accept.cancel()
        await h.close()
        with contextlib.suppress(asyncio.CancelledError):
            await accept


@pytest.fixture
def pem_files(tmp_path: Path) -> Iterator[Callable[[WorkloadCertificate, str], tuple[Path, Path]]]:
    """Write a certificate's key and chain to tmp files (for external tools only)."""

    def write(cert: WorkloadCertificate, name: str) -> tuple[Path, Path]:
        key = tmp_path / f"{name}.key"
        crt = tmp_path / f"{name}.crt"
        key.write_bytes(cert.key_pem)
        key.chmod(0o600)
        crt.write_bytes(b"".join(cert.chain_pem))
        return key, crt

    yield write
