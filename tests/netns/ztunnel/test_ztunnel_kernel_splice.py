"""Same-node bulk on the splice(2) relay, on a real lab mesh (``--same-node-splice auto``).

In ``auto`` a same-node connection starts on the Python relay; once a burst
passes 1 MiB it is handed to the splice(2) relay (ztunnel/proxy/pipes.py):
socket -> pipe -> socket in the kernel. checkout and other live on node-a.
The hand-over is observed from outside: node-a's ztunnel processes hold two
extra pipes (four fds) while such a connection lives, and none after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.apps import TcpServer, listen
from lab.netns import in_netns
from tests.support.ztunnel_lab import NODE_A, STEERING, Lab, connect_from, revoke_policy

pytestmark = pytest.mark.skipif(STEERING != "ebpf", reason="same-node auto needs the agent's pins")

TALK, RESETTER = 9110, 9111
_HEAD = struct.Struct("!cI")
BIG = 64 << 20


def pattern(size: int) -> bytes:
    return (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def hash_until_eof(sock: socket.socket) -> tuple[int, bytes]:
    h, n = hashlib.sha256(), 0
    while data := sock.recv(1 << 20):
        h.update(data)
        n += len(data)
    return n, h.digest()


def talker(conn: socket.socket) -> None:
    """b"k" + 0: hash until EOF, answer count(8) + sha256; b"s" + size: send pattern(size)."""
    head = conn.recv(_HEAD.size, socket.MSG_WAITALL)
    if len(head) < _HEAD.size:
        return
    cmd, size = _HEAD.unpack(head)
    if cmd == b"k":
        n, digest = hash_until_eof(conn)
        conn.sendall(struct.pack("!Q", n) + digest)
    elif cmd == b"s":
        conn.sendall(pattern(size))


def ztunnel_pipes(lab: Lab) -> int:
    """Pipe fds held by node-a's ztunnel process group (its workers included)."""
    pgid = lab.mesh.ztunnels[NODE_A].pid
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    count += os.readlink(fd).startswith("pipe:")
    return count


def wait_pipes(lab: Lab, pred: Callable[[int], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pred(ztunnel_pipes(lab)):
            return
        time.sleep(0.02)
    raise AssertionError(f"node-a's ztunnel pipes: expected {what}, have {ztunnel_pipes(lab)}")


def access_line(lab: Lab, port: int) -> dict[str, Any]:
    import json

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in reversed(lab.log(NODE_A).splitlines()):
            start = line.find('{"time"')
            if start < 0 or '"connection_closed"' not in line:
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line[start:])
                if entry.get("route") == "same_node" and str(entry.get("src")).endswith(f":{port}"):
                    return dict(entry)
        time.sleep(0.05)
    raise AssertionError(f"no access log line for :{port}")


@pytest.fixture(scope="module")
def talk(lab: Lab) -> Iterator[Lab]:
    with in_netns(lab.mesh.pod("other").lab.netns):
        listener = listen("::", TALK)
    server = TcpServer(listener, talker).start()
    try:
        yield lab
    finally:
        server.stop()


@pytest.fixture
def baseline(talk: Lab) -> Iterator[int]:
    """Pipes before the test; after it, the count must be back there (no fd leak)."""
    wait_pipes(talk, lambda n: True, "any")
    before = ztunnel_pipes(talk)
    yield before
    wait_pipes(talk, lambda n: n == before, f"{before} again (pipes closed)")


def test_64_mib_both_ways_through_pipes_counted_exactly(talk: Lab, baseline: int) -> None:
    lab = talk
    data = os.urandom(BIG)
    with connect_from(lab, "checkout", lab.ip("other"), TALK, timeout=60) as s:
        port = s.getsockname()[1]
        s.sendall(_HEAD.pack(b"k", 0) + data[: 8 << 20])
        # The connection turned bulk: the relay handed it to two pipes.
        wait_pipes(lab, lambda n: n >= baseline + 4, f"{baseline + 4} (moved to splice(2))")
        s.sendall(data[8 << 20 :])
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == struct.pack("!Q", BIG) + hashlib.sha256(data).digest()
    line = access_line(lab, port)
    assert (line["bytes_received"], line["bytes_sent"]) == (_HEAD.size + BIG, 40)
    assert line["error"] is None
    with connect_from(lab, "checkout", lab.ip("other"), TALK, timeout=60) as s:
        port = s.getsockname()[1]
        s.sendall(_HEAD.pack(b"s", BIG))
        assert hash_until_eof(s) == (BIG, hashlib.sha256(pattern(BIG)).digest())
    line = access_line(lab, port)
    assert (line["bytes_received"], line["bytes_sent"]) == (_HEAD.size, BIG)


def test_half_close_under_load_loses_no_tail(talk: Lab, baseline: int) -> None:
    lab = talk
    for i in range(20):
        size = (3 << 20) + 7919 * i
        data = pattern(size)
        with connect_from(lab, "checkout", lab.ip("other"), TALK, timeout=30) as s:
            s.sendall(_HEAD.pack(b"k", 0) + data)
            s.shutdown(socket.SHUT_WR)
            expected = struct.pack("!Q", size) + hashlib.sha256(data).digest()
            assert recv_all(s) == expected, f"round {i}: client->server tail lost"
        with connect_from(lab, "checkout", lab.ip("other"), TALK, timeout=30) as s:
            s.sendall(_HEAD.pack(b"s", size))
            s.shutdown(socket.SHUT_WR)  # both directions half-closed in turn
            assert recv_all(s) == data, f"round {i}: server->client tail lost"


def test_reset_propagates_both_ways(talk: Lab, baseline: int) -> None:
    lab = talk
    seen: list[str] = []

    def resetter(conn: socket.socket) -> None:
        first = conn.recv(1, socket.MSG_WAITALL)
        if first == b"r":  # take 4 MiB of a bulk upload, then abort
            got = 0
            while got < (4 << 20) and (data := conn.recv(1 << 20)):
                got += len(data)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # TcpServer closes it: a RST
        try:  # stream until the client's reset arrives
            block = b"\xa5" * (1 << 20)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                conn.sendall(block)
            seen.append("no reset")
        except (ConnectionResetError, BrokenPipeError):
            seen.append("reset")

    with in_netns(lab.mesh.pod("other").lab.netns):
        listener = listen("::", RESETTER)
    server = TcpServer(listener, resetter).start()
    try:
        with connect_from(lab, "checkout", lab.ip("other"), RESETTER, timeout=30) as s:
            block = b"r" * (1 << 20)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                for _ in range(64):
                    s.sendall(block)
        s = connect_from(lab, "checkout", lab.ip("other"), RESETTER, timeout=30)
        s.sendall(b"d")
        got = 0
        while got < (8 << 20):
            got += len(s.recv(1 << 20))
        wait_pipes(lab, lambda n: n >= baseline + 4, "the download on pipes")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == ["reset"]
    finally:
        server.stop()


def test_policy_change_closes_a_bulk_connection(talk: Lab, baseline: int) -> None:
    lab = talk
    sock = connect_from(lab, "checkout", lab.ip("other"), TALK, timeout=30)
    stop = threading.Event()
    outcome: list[BaseException] = []

    def upload() -> None:
        block = os.urandom(1 << 20)
        try:
            sock.sendall(_HEAD.pack(b"k", 0))
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                sock.sendall(block)
        except OSError as e:
            outcome.append(e)

    sender = threading.Thread(target=upload, daemon=True)
    sender.start()
    try:
        wait_pipes(lab, lambda n: n >= baseline + 4, "the upload on pipes")

        lab.set_registry(revoke_policy("other-allow-checkout"))
        sender.join(30)
        assert outcome and isinstance(outcome[0], ConnectionResetError | BrokenPipeError)
    finally:
        stop.set()
        sender.join(5)
        sock.close()
        lab.restore_registry()
    lab.wait_log(NODE_A, "policy re-check")
    lab.wait_state(NODE_A, lambda d: not d.get("connections"))
