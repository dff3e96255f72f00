"""UnderlayCapture tells plaintext from TLS on the wire between nodes."""

from __future__ import annotations

import datetime
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lab import LabPod, Topology, in_netns
from lab.apps import echo_roundtrip, listen, serve, sink_bytes
from lab.capture import (
    UnderlayCapture,
    parse_tcp_frame,
    summarize_pcap,
    tls_records,
)

MARKER = b"VEIL-PLAINTEXT-MARKER-7d1c"


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"", []),
        (b"\x16\x03\x01\x00\x02ab\x17\x03\x03\x00\x01z", [(22, 2), (23, 1)]),
        (b"\x17\x03\x03\x00\x01zGET / HTTP/1.1", [(23, 1)]),
        (b"GET / HTTP/1.1\r\n", []),
        (b"\x17\x02\x03\x00\x01z", []),  # not TLS 1.x
        (b"\x17\x03\x03\xff\xff", []),  # longer than any TLS record
    ],
)
def test_tls_records_walks_record_headers(stream: bytes, expected: list[tuple[int, int]]) -> None:
    assert tls_records(stream) == expected


def test_parse_tcp_frame_ignores_non_tcp() -> None:
    eth = b"\x02" * 12 + b"\x08\x06"  # ARP
    assert parse_tcp_frame(eth + b"\x00" * 40) is None
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 44, 0, 0, 64, 6, 0, b"\n\0\0\1", b"\n\0\0\2")
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 7, 0, 0x50, 0x02, 1024, 0, 0) + b"abcd"
    seg = parse_tcp_frame(b"\x02" * 12 + b"\x08\x00" + ip + tcp + b"\0\0")  # eth padding
    assert seg is not None
    assert (seg.src, seg.dst, seg.sport, seg.dport, seg.syn, seg.payload) == (
        "10.0.0.1",
        "10.0.0.2",
        1234,
        80,
        True,
        b"abcd",
    )


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _tls_echo_once(pod: LabPod, port: int, files: tuple[Path, Path]) -> threading.Thread:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(files[1]), str(files[0]))
    with in_netns(pod.netns):
        sock = listen("0.0.0.0", port)
    sock.settimeout(5)

    def serve_once() -> None:
        with sock, ctx.wrap_socket(sock.accept()[0], server_side=True) as conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def capture(lab: Topology) -> Iterator[UnderlayCapture]:
    with UnderlayCapture(lab) as cap:
        yield cap


def test_plaintext_marker_is_seen_across_nodes(lab: Topology, capture: UnderlayCapture) -> None:
    a, b = lab.pod("pod-0", "node-a"), lab.pod("pod-0", "node-b")
    payload = b"x" * 3000 + MARKER + b"y" * 3000
    with serve(b.netns, "echo", 7000), a.connect_tcp(b.ip, 7000) as sock:
        assert echo_roundtrip(sock, payload) == payload
    assert capture.wait_for(lambda c: c.contains(MARKER))
    assert 7000 in capture.tcp_connection_ports()
    assert 7000 in capture.tcp_ports_seen()
    assert capture.tls_records_seen() == 0


def test_tls_hides_the_marker(
    lab: Topology, capture: UnderlayCapture, tls_files: tuple[Path, Path]
) -> None:
    a, b = lab.pod("pod-1", "node-a"), lab.pod("pod-1", "node-b")
    server = _tls_echo_once(b, 8443, tls_files)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with a.connect_tcp(b.ip, 8443) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(MARKER * 100)
        received = b""
        while len(received) < len(MARKER) * 100:
            received += tls.recv(65536)
    server.join(5)
    assert received == MARKER * 100
    # Application data records: at least one each way, after the handshake.
    assert capture.wait_for(lambda c: c.tls_records_seen() >= 4)
    assert not capture.contains(MARKER)
    assert capture.tcp_connection_ports() == {8443}


def test_same_node_traffic_does_not_cross_the_underlay(
    lab: Topology, capture: UnderlayCapture
) -> None:
    a, b = lab.pod("pod-0", "node-a"), lab.pod("pod-1", "node-a")
    with serve(b.netns, "echo", 7000), a.connect_tcp(b.ip, 7000) as sock:
        assert echo_roundtrip(sock, MARKER) == MARKER
    time.sleep(0.1)
    assert not capture.contains(MARKER)


def test_capture_is_bounded(lab: Topology) -> None:
    a, b = lab.pod("pod-2", "node-a"), lab.pod("pod-2", "node-b")
    with UnderlayCapture(lab, limit=100_000) as cap:
        with serve(b.netns, "sink", 9000), a.connect_tcp(b.ip, 9000) as sock:
            assert sink_bytes(sock, 4_000_000) == 4_000_000
        assert cap.wait_for(lambda c: c.dropped > 0)
    assert cap.captured_bytes <= 100_000


def test_pcap_written_from_the_capture_reads_in_tshark(
    lab: Topology, capture: UnderlayCapture, tmp_path: Path
) -> None:
    a, b = lab.pod("pod-0", "node-a"), lab.pod("pod-0", "node-b")
    with serve(b.netns, "echo", 7000), a.connect_tcp(b.ip, 7000) as sock:
        assert echo_roundtrip(sock, MARKER) == MARKER
    assert capture.wait_for(lambda c: c.contains(MARKER))
    summary = summarize_pcap(capture.write_pcap(tmp_path / "underlay.pcap"))
    assert f"{a.ip}:" in summary and f"{b.ip}:7000" in summary
