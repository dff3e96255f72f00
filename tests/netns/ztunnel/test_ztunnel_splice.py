"""The same-node kernel fast path on a real lab mesh (agent eBPF steering + pins).

checkout, other and intruder live on node-a; other accepts only checkout.
The agent pins the splice (ebpf/sockmap.bpf.c) under its pin directory and
the ztunnel, given the same --pin-dir, splices checkout -> other in the
kernel. The last test restarts node-a's ztunnel without pins and checks the
Python relay carries the bytes, with one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lab.apps import TcpServer, echo_roundtrip, listen, sink_bytes, source_bytes
from lab.netns import in_netns
from node import bpf
from tests.support.ztunnel_lab import NODE_A, STEERING, Lab, connect_from, revoke_policy

pytestmark = pytest.mark.skipif(STEERING != "ebpf", reason="the splice pins come from the agent")

ECHO, SINK, SOURCE, RESETTER = 9100, 9101, 9102, 9103
WARNING = "same-node fast path off, using the Python relay"


@pytest.fixture(scope="module")
def lab(lab: Lab) -> Iterator[Lab]:
    """The shared lab with node-a's ztunnel splicing every same-node connection."""
    with ztunnel_args(lab, "--same-node-splice", "always"):
        yield lab


@contextlib.contextmanager
def ztunnel_args(lab: Lab, *args: str) -> Iterator[None]:
    """Restart node-a's ztunnel with ``args`` added; restore it afterwards."""
    mesh = lab.mesh
    saved = mesh.extra_ztunnel_args
    mesh.stop_ztunnel(NODE_A)
    mesh.extra_ztunnel_args = (*saved, *args)
    try:
        mesh.start_ztunnel(NODE_A)
        mesh.wait_ztunnel_ready(NODE_A)
        yield
    finally:
        mesh.stop_ztunnel(NODE_A)
        mesh.extra_ztunnel_args = saved
        mesh.start_ztunnel(NODE_A)
        mesh.wait_ztunnel_ready(NODE_A)


@pytest.fixture(scope="module")
def apps(lab: Lab) -> Iterator[dict[str, TcpServer]]:
    servers = {
        "echo": lab.serve("other", "echo", ECHO),
        "sink": lab.serve("other", "sink", SINK),
        "source": lab.serve("other", "source", SOURCE),
    }
    yield servers
    for server in servers.values():
        server.stop()


def spliced_sockets(lab: Lab) -> int:
    """How many sockets sit in node-a's splice_socks right now."""
    fd = bpf.obj_get(str(lab.mesh.pin_dir(NODE_A) / "splice_socks"))
    try:
        count, key = 0, None
        while (key := bpf.map_next_key(fd, key, 8)) is not None and count < 100_000:
            count += 1
        return count
    finally:
        os.close(fd)


def access_lines(lab: Lab, node: str) -> list[dict[str, Any]]:
    out = []
    for line in lab.log(node).splitlines():
        start = line.find('{"time"')
        if start >= 0 and '"connection_closed"' in line:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line[start:]))
    return out


def wait_access_line(lab: Lab, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [e for e in access_lines(lab, NODE_A) if pred(e)]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError("no matching access log line on node-a")


def from_port(port: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("route") == "same_node" and str(e.get("src", "")).endswith(f":{port}")


def test_pins_exist_and_a_live_connection_is_spliced(lab: Lab, apps: dict[str, TcpServer]) -> None:
    names = {p.name for p in lab.mesh.pin_dir(NODE_A).iterdir()}
    assert {"splice_socks", "splice_targets", "splice_peers", "prog_splice_verdict"} <= names
    with connect_from(lab, "checkout", lab.ip("other"), ECHO) as s:
        s.sendall(b"hello")
        assert s.recv(5) == b"hello"
        assert spliced_sockets(lab) >= 2
    lab.wait_log(NODE_A, "same-node kernel splice on")
    assert WARNING not in lab.log(NODE_A)


@pytest.mark.parametrize("size", [0, 1, 64 << 10, 8 << 20, random.Random(7).randrange(1, 3 << 20)])
def test_bytes_intact_both_ways_and_counted_exactly(
    lab: Lab, apps: dict[str, TcpServer], size: int
) -> None:
    payload = os.urandom(size)
    with connect_from(lab, "checkout", lab.ip("other"), ECHO, timeout=30) as s:
        port = s.getsockname()[1]
        assert echo_roundtrip(s, payload) == payload
    line = wait_access_line(lab, from_port(port))
    assert (line["bytes_received"], line["bytes_sent"]) == (size, size)
    assert line["error"] is None and line["verdict"] == "allow"


def test_half_close_under_load_loses_no_tail(lab: Lab, apps: dict[str, TcpServer]) -> None:
    for i in range(20):
        size = (1 << 20) + 7919 * i
        with connect_from(lab, "checkout", lab.ip("other"), SINK, timeout=30) as s:
            # A FIN that arrives before the splice is relayed in Python (a
            # sockhash takes only established sockets): give the ztunnel the
            # moment it needs, so the half-close meets the splice.
            time.sleep(0.05)
            assert sink_bytes(s, size) == size, f"round {i}: client->server tail lost"
        with connect_from(lab, "checkout", lab.ip("other"), SOURCE, timeout=30) as s:
            assert source_bytes(s, size) == size, f"round {i}: server->client tail lost"
    assert WARNING not in lab.log(NODE_A), "these rounds went through the Python relay"


def test_live_counts_show_in_connections(lab: Lab, apps: dict[str, TcpServer]) -> None:
    with connect_from(lab, "checkout", lab.ip("other"), ECHO) as s:
        port = s.getsockname()[1]
        s.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += s.recv(4096)

        def counted(dump: dict[str, Any]) -> bool:
            mine = [c for c in dump.get("connections", []) if c["src"].endswith(f":{port}")]
            return bool(mine) and (mine[0]["bytes_received"], mine[0]["bytes_sent"]) == (1000, 1000)

        lab.wait_state(NODE_A, counted)


def test_reset_propagates_both_ways(lab: Lab, apps: dict[str, TcpServer]) -> None:
    seen: list[str] = []

    def resetter(conn: socket.socket) -> None:
        first = conn.recv(16)
        if first == b"reset-me":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # TcpServer closes it: a RST
        try:
            while conn.recv(4096):
                pass
            seen.append("eof")
        except ConnectionResetError:
            seen.append("reset")

    with in_netns(lab.mesh.pod("other").lab.netns):
        listener = listen("::", RESETTER)
    server = TcpServer(listener, resetter).start()
    try:
        with connect_from(lab, "checkout", lab.ip("other"), RESETTER) as s:
            s.sendall(b"reset-me")
            with pytest.raises(ConnectionResetError):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and s.recv(4096):
                    pass
        s = connect_from(lab, "checkout", lab.ip("other"), RESETTER)
        s.sendall(b"client-resets")
        time.sleep(0.2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == ["reset"]
    finally:
        server.stop()


def test_policy_change_closes_a_spliced_connection(lab: Lab, apps: dict[str, TcpServer]) -> None:
    sock = connect_from(lab, "checkout", lab.ip("other"), ECHO)
    try:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"

        lab.set_registry(revoke_policy("other-allow-checkout"))
        with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
                time.sleep(0.05)
    finally:
        sock.close()
        lab.restore_registry()
    lab.wait_log(NODE_A, "policy re-check")
    lab.wait_state(NODE_A, lambda d: not d.get("connections"))
    assert spliced_sockets(lab) == 0


def test_without_pins_the_python_relay_carries_bytes_and_warns_once(
    lab: Lab, apps: dict[str, TcpServer]
) -> None:
    mesh = lab.mesh
    saved = mesh.extra_ztunnel_args
    mesh.stop_ztunnel(NODE_A)
    mesh.extra_ztunnel_args = (*saved, "--pin-dir", str(mesh.pin_dir(NODE_A)) + "-absent")
    try:
        mesh.start_ztunnel(NODE_A)
        mesh.wait_ztunnel_ready(NODE_A)
        start = len(lab.log(NODE_A))
        for size in (0, 1, 64 << 10, 2 << 20):
            payload = os.urandom(size)
            with connect_from(lab, "checkout", lab.ip("other"), ECHO, timeout=30) as s:
                port = s.getsockname()[1]
                assert echo_roundtrip(s, payload) == payload
            line = wait_access_line(lab, from_port(port))
            assert (line["bytes_received"], line["bytes_sent"]) == (size, size)
        warnings = [line for line in lab.log(NODE_A)[start:].splitlines() if WARNING in line]
        # Once per process: each ztunnel worker decides for itself.
        workers = [re.search(r"\[w\d+\]", line) for line in warnings]
        tags = [m.group(0) if m else "" for m in workers]
        assert warnings and len(tags) == len(set(tags)), warnings
        assert "to enable: run the agent with --pin-dir" in warnings[0]
    finally:
        mesh.stop_ztunnel(NODE_A)
        mesh.extra_ztunnel_args = saved
        mesh.start_ztunnel(NODE_A)
        mesh.wait_ztunnel_ready(NODE_A)
    with connect_from(lab, "checkout", lab.ip("other"), ECHO) as s:
        assert echo_roundtrip(s, b"back") == b"back"


# --- auto: relay first, promoted to the splice once interactive -------------
#
# These run last: the module's ztunnel is restarted in auto mode for them.
# The talk server speaks a small framed protocol, so one connection can be a
# conversation first and a transfer or a half-close afterwards:
#   b"e" + size(4) + bytes  -> the same bytes back;
#   b"k" + 0(4) + bytes... EOF -> count(8) + sha256 of what arrived, then close;
#   b"s" + size(4)          -> ``pattern(size)``, then close.

TALK = 9104
_HEAD = struct.Struct("!cI")


def pattern(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        data = sock.recv(min(size - got, 1 << 20))
        if not data:
            raise AssertionError(f"EOF after {got} of {size} bytes")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def talker(conn: socket.socket) -> None:
    while head := conn.recv(_HEAD.size, socket.MSG_WAITALL):
        cmd, size = _HEAD.unpack(head)
        if cmd == b"e":
            conn.sendall(recv_exact(conn, size))
        elif cmd == b"k":
            data = recv_all(conn)
            conn.sendall(struct.pack("!Q", len(data)) + hashlib.sha256(data).digest())
            return
        elif cmd == b"s":
            conn.sendall(pattern(size))
            return


def converse(sock: socket.socket, turns: int, size: int = 64) -> int:
    """``turns`` echo exchanges of ``size`` bytes; returns the bytes sent."""
    for _ in range(turns):
        msg = os.urandom(size)
        sock.sendall(_HEAD.pack(b"e", size) + msg)
        assert recv_exact(sock, size) == msg
    return turns * (_HEAD.size + size)


def is_spliced(lab: Lab, port: int) -> bool | None:
    """Whether node-a's /config_dump shows the connection from ``port`` spliced."""
    for c in lab.mesh.config_dump(NODE_A).get("connections", []):
        if c["src"].endswith(f":{port}"):
            return bool(c.get("spliced"))
    return None


def wait_spliced(lab: Lab, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if is_spliced(lab, port):
            return
        time.sleep(0.02)
    raise AssertionError(f"the connection from :{port} was not promoted to the splice")


@pytest.fixture(scope="module")
def auto(lab: Lab, apps: dict[str, TcpServer]) -> Iterator[Lab]:
    with in_netns(lab.mesh.pod("other").lab.netns):
        listener = listen("::", TALK)
    server = TcpServer(listener, talker).start()
    try:
        with ztunnel_args(lab, "--same-node-splice", "auto"):
            yield lab
    finally:
        server.stop()


def test_auto_promotes_an_interactive_flow(auto: Lab) -> None:
    lab = auto
    with connect_from(lab, "checkout", lab.ip("other"), TALK) as s:
        port = s.getsockname()[1]
        sent = converse(s, 5)
        wait_spliced(lab, port)
        assert spliced_sockets(lab) >= 2
        sent += converse(s, 20, size=1000)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
    line = wait_access_line(lab, from_port(port))
    # Relay bytes before the promotion plus map bytes after it, exactly.
    assert (line["bytes_received"], line["bytes_sent"]) == (sent, 5 * 64 + 20 * 1000)
    assert line["error"] is None


def test_auto_keeps_a_bulk_flow_on_the_relay(auto: Lab) -> None:
    lab = auto
    with connect_from(lab, "checkout", lab.ip("other"), TALK, timeout=30) as s:
        port = s.getsockname()[1]
        big = os.urandom(4 << 20)
        s.sendall(_HEAD.pack(b"e", len(big)) + big)
        assert recv_exact(s, len(big)) == big
        converse(s, 10)  # a bulk connection stays bulk
        assert is_spliced(lab, port) is False
    with connect_from(lab, "checkout", lab.ip("other"), SINK, timeout=30) as s:
        port = s.getsockname()[1]
        block = b"\x5a" * (256 << 10)
        for _ in range(32):
            s.sendall(block)
        assert is_spliced(lab, port) is False
        s.shutdown(socket.SHUT_WR)
        assert int(recv_all(s)) == 32 * len(block)


@pytest.mark.parametrize("size", [1, 64 << 10, 8 << 20, random.Random(11).randrange(1, 3 << 20)])
def test_auto_bytes_intact_across_promotion_both_ways(auto: Lab, size: int) -> None:
    lab = auto
    with connect_from(lab, "checkout", lab.ip("other"), TALK, timeout=30) as s:
        port = s.getsockname()[1]
        sent = converse(s, 3)
        wait_spliced(lab, port)
        payload = os.urandom(size)
        s.sendall(_HEAD.pack(b"e", size) + payload)
        assert recv_exact(s, size) == payload
        sent += _HEAD.size + size
        # Pipelined: a message and a transfer behind it, sent without waiting,
        # in flight while the connection is promoted or just after.
        msg = os.urandom(64)
        s.sendall(_HEAD.pack(b"e", 64) + msg + _HEAD.pack(b"s", size))
        sent += 2 * _HEAD.size + 64
        expected = msg + pattern(size)
        assert recv_all(s) == expected
    line = wait_access_line(lab, from_port(port))
    assert (line["bytes_received"], line["bytes_sent"]) == (sent, 3 * 64 + size + len(expected))
    assert line["error"] is None


def test_auto_half_close_after_promotion_loses_no_tail(auto: Lab) -> None:
    lab = auto
    start = len(lab.log(NODE_A))
    for i in range(20):
        size = (1 << 20) + 7919 * i
        with connect_from(lab, "checkout", lab.ip("other"), TALK, timeout=30) as s:
            converse(s, 3)
            wait_spliced(lab, s.getsockname()[1])
            data = pattern(size)
            s.sendall(_HEAD.pack(b"k", 0) + data)
            s.shutdown(socket.SHUT_WR)
            answer = recv_all(s)
            expected = struct.pack("!Q", size) + hashlib.sha256(data).digest()
            assert answer == expected, f"round {i}: client->server tail lost"
        with connect_from(lab, "checkout", lab.ip("other"), TALK, timeout=30) as s:
            converse(s, 3)
            wait_spliced(lab, s.getsockname()[1])
            s.sendall(_HEAD.pack(b"s", size))
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == pattern(size), f"round {i}: server->client tail lost"
    assert WARNING not in lab.log(NODE_A)[start:]


def test_auto_promotes_plain_ping_pong_on_an_echo_server(auto: Lab) -> None:
    lab = auto
    with connect_from(lab, "checkout", lab.ip("other"), ECHO) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port = s.getsockname()[1]
        for _ in range(50):
            s.sendall(b"r" * 64)
            assert recv_exact(s, 64) == b"r" * 64
        wait_spliced(lab, port)
