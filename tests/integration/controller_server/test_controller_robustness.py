"""The controller survives hostile input on both ports, and follows a CA rotation."""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from cryptography import x509

from .conftest import REPO, RunningController, Watcher, stop_process, veil_argv

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def client_hello_prefix(size: int) -> bytes:
    """The first ``size`` bytes of a real TLS ClientHello, made without a socket."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="veil-controller")
    with suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16  # a TLS handshake record
    return hello[:size]


def send_and_close(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(2)
            while s.recv(4096):
                pass
        except OSError:
            pass  # the controller may reset the connection: that is the point


@contextmanager
def half_open(port: int, data: bytes) -> Iterator[socket.socket]:
    """A connection that starts a TLS handshake and then says nothing more."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(data)
        yield s
    finally:
        s.close()


async def test_garbage_and_half_open_tls_on_both_ports(controller: RunningController) -> None:
    rng = os.urandom
    for port in (controller.mtls_port, controller.join_port):
        send_and_close(port, rng(4096))
        send_and_close(port, b"\x16\x03\x01\xff\xff" + rng(2000))  # a TLS record header, lying
        send_and_close(port, HTTP2_PREFACE + rng(512))  # plaintext HTTP/2 on a TLS port
        send_and_close(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        send_and_close(port, client_hello_prefix(60))
        # A full TLS handshake that sends nonsense instead of HTTP/2.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                ctx.wrap_socket(raw, server_hostname="veil-controller") as tls,
            ):
                tls.sendall(rng(1024))
        except (OSError, ssl.SSLError):
            pass  # the mTLS port refuses a client without a certificate

    with (
        half_open(controller.mtls_port, client_hello_prefix(100)),
        half_open(controller.join_port, client_hello_prefix(100)),
    ):
        # While those stall, real nodes join (join port) and watch (mTLS port).
        creds = await controller.join("node-a")
        watch = await Watcher.open(creds)
        try:
            snap = await watch.next(timeout=10)
            assert snap.snapshot and len(watch.held) > 0
        finally:
            await watch.close()
        assert await controller.health() == 1
    assert controller.alive(), controller.stderr()
    assert "Traceback" not in controller.stderr()


async def test_trust_bundle_follows_ca_rotate(controller: RunningController) -> None:
    creds = await controller.join("node-a")
    watch = await Watcher.open(creds)
    try:
        await watch.next()
        assert len(watch.bundle) == 1
        old_root = watch.bundle[0]

        rotated = subprocess.run(
            veil_argv("controller", "ca", "rotate", "--state-dir", str(controller.state_dir)),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rotated.returncode == 0, rotated.stderr
        new_fingerprint = rotated.stdout.strip()

        deadline = time.monotonic() + 15
        update = await watch.next(timeout=15)
        while update.trust_bundle is None and time.monotonic() < deadline:
            update = await watch.next(timeout=15)
        assert update.trust_bundle is not None
        assert len(update.trust_bundle.roots) == 2 and old_root in update.trust_bundle.roots

        # The existing stream keeps working, and a node joining with a token
        # made after the rotation (pinning the new root) gets in.
        fresh = await controller.join("node-b")
        assert new_fingerprint in controller.token("node-c")  # tokens now carry the new root
        fresh_watch = await Watcher.open(fresh)
        try:
            snap = await fresh_watch.next()
            assert snap.trust_bundle is not None and len(snap.trust_bundle.roots) == 2
        finally:
            await fresh_watch.close()
        # The node joined before the rotation keeps the bundle it was sent on the
        # stream (as agents do) and reaches the controller again after a reconnect.
        again = await Watcher.open(dataclasses.replace(creds, trust_bundle_pem=watch.bundle))
        try:
            assert (await again.next()).snapshot
        finally:
            await again.close()
        issuers = {
            x509.load_pem_x509_certificate(r).subject.rfc4514_string()
            for r in update.trust_bundle.roots
        }
        assert len(issuers) == 2
    finally:
        await watch.close()
    assert stop_process(controller.proc) == 0


def test_second_controller_on_the_same_port_fails_instead_of_sharing(
    controller: RunningController, tmp_path: Path
) -> None:
    other = subprocess.run(
        veil_argv(
            "controller",
            "run",
            "--registry",
            str(controller.registry),
            "--state-dir",
            str(tmp_path / "other-state"),
            "--listen",
            controller.mtls,
            "--join-listen",
            "127.0.0.1:0",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 1
    assert f"cannot listen on {controller.mtls} (mTLS listener)" in other.stderr
    assert controller.alive()
