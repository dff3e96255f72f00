"""Tiny TCP applications for labs: echo, whoami, sink and source.

They play the workloads in netns tests, ``veil demo`` and perf/, either in
process (:func:`serve` runs a threaded server on a socket opened inside a
namespace) or as a process (``python -m lab.apps echo --port 8080``,
started with :meth:`Topology.start_app`). This module imports nothing from
Veil at load time, so app processes start fast.

Protocols (all plain TCP, one exchange per connection):

- ``echo``: sends back every byte it receives until the client closes.
- ``whoami``: HTTP-ish; reads a request head (or nothing, for 1 s) and answers
  ``HTTP/1.1 200`` with a JSON body naming the client address the server saw
  and its own local address, so tests can assert the real client IP arrived.
- ``sink``: reads until EOF, then answers the byte count as ``<n>\\n``.
- ``source``: reads ``<n>\\n`` and sends ``n`` bytes, then closes.
- ``http``: HTTP/1.1 with keep-alive (Content-Length bodies; chunked bodies
  are answered 411): every request gets ``200`` and the body
  ``<name> saw <METHOD> <path>``, and one line ``seen {json}`` (method, path,
  client address, whether an Authorization header arrived) goes to stdout, so
  a test or the demo can tell what reached the application.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

__all__ = [
    "APPS",
    "TcpServer",
    "WhoAmI",
    "app_argv",
    "echo_roundtrip",
    "http_request",
    "main",
    "serve",
    "sink_bytes",
    "source_bytes",
    "whoami",
]

_CHUNK = 256 * 1024
_HEAD_LIMIT = 16 * 1024

Handler = Callable[[socket.socket], None]


@dataclass(frozen=True)
class WhoAmI:
    """What a whoami server saw: the client's address and its own."""

    peer_ip: str
    peer_port: int
    local_ip: str
    local_port: int


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(_CHUNK):
        conn.sendall(data)


def _whoami(conn: socket.socket) -> None:
    peer = conn.getpeername()
    local = conn.getsockname()
    head = b""
    conn.settimeout(1.0)
    with contextlib.suppress(TimeoutError):
        while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
            data = conn.recv(4096)
            if not data:
                break
            head += data
    body = json.dumps(
        {
            "peer_ip": _unmap(peer[0]),
            "peer_port": peer[1],
            "local_ip": _unmap(local[0]),
            "local_port": local[1],
        }
    ).encode()
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


def _sink(conn: socket.socket) -> None:
    total = 0
    while data := conn.recv(_CHUNK):
        total += len(data)
    conn.sendall(f"{total}\n".encode())


def _source(conn: socket.socket) -> None:
    line = b""
    while not line.endswith(b"\n") and len(line) < 32:
        data = conn.recv(1)
        if not data:
            return
        line += data
    remaining = int(line)
    block = bytes(range(256)) * (_CHUNK // 256)
    while remaining > 0:
        n = min(remaining, len(block))
        conn.sendall(block[:n])
        remaining -= n


def _read_head(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """(head, rest) once ``buf`` plus what arrives holds a full request head."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > _HEAD_LIMIT:
            return None
        data = conn.recv(4096)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _http(conn: socket.socket) -> None:
    peer = _unmap(conn.getpeername()[0])
    buf = b""
    while True:
        got = _read_head(conn, buf)
        if got is None:
            return
        head, buf = got
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, path, _version = lines[0].split(" ")
        except ValueError:
            conn.sendall(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            conn.sendall(
                b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return
        length = int(headers.get("content-length", "0") or 0)
        while len(buf) < length:
            data = conn.recv(_CHUNK)
            if not data:
                return
            buf += data
        buf = buf[length:]
        seen = {
            "method": method,
            "path": path,
            "client": peer,
            "authorization": "authorization" in headers,
        }
        print("seen " + json.dumps(seen, sort_keys=True), flush=True)
        body = f"payments saw {method} {path}\n".encode()
        close = headers.get("connection", "").lower() == "close"
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + (b"Connection: close\r\n" if close else b"")
            + b"\r\n"
            + body
        )
        if close:
            return


APPS: dict[str, Handler] = {
    "echo": _echo,
    "whoami": _whoami,
    "sink": _sink,
    "source": _source,
    "http": _http,
}


class TcpServer:
    """Serves one app on a listening socket, a thread per connection."""

    def __init__(self, listener: socket.socket, handler: Handler) -> None:
        self.listener = listener
        self.handler = handler
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> TcpServer:
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # listener shut down by stop()
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass  # the client went away mid-exchange; nothing to report
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def stop(self) -> None:
        """Stop accepting and cut open connections (idempotent)."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def __enter__(self) -> TcpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unmap(ip: str) -> str:
    """A dual-stack listener reports IPv4 peers as ``::ffff:a.b.c.d``."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def listen(host: str, port: int, *, transparent: bool = False) -> socket.socket:
    """A listener on ``host:port``. ``::`` serves IPv4 and IPv6 on one
    dual-stack socket (what apps in dual-stack pods do; IPv4 peers then read as
    ``::ffff:a.b.c.d``); ``0.0.0.0`` serves IPv4 only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(netns: str | None, app: str, port: int, host: str = "::") -> TcpServer:
    """Run ``app`` in this process on a listener created inside ``netns`` (None: here)."""
    from lab.netns import in_netns  # here, so the process entry point stays light

    handler = APPS[app]
    if netns is None:
        sock = listen(host, port)
    else:
        with in_netns(netns):
            sock = listen(host, port)
    return TcpServer(sock, handler).start()


def app_argv(app: str, port: int, *extra: str) -> list[str]:
    """The command line that runs ``app`` as its own process."""
    if app not in APPS:
        raise ValueError(f"unknown lab app {app!r}; choose one of {sorted(APPS)}")
    # Run by path, not with -m: importing the lab package (pyroute2 and
    # all) would triple the start-up time of every app process. -P keeps this
    # directory off sys.path, so its modules cannot shadow the standard library.
    return [sys.executable, "-P", str(Path(__file__).resolve()), app, "--port", str(port), *extra]


# -- clients (work on any connected socket, e.g. one from LabPod.connect_tcp) --


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(_CHUNK):
        chunks.append(data)
    return b"".join(chunks)


def echo_roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload``, half-close, return what came back."""
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    return _read_all(sock)


def whoami(sock: socket.socket, host: str = "lab") -> WhoAmI:
    """Ask a whoami server who we are."""
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    response = _read_all(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"whoami answered {head[:80]!r}")
    data = json.loads(body)
    return WhoAmI(data["peer_ip"], data["peer_port"], data["local_ip"], data["local_port"])


def http_request(
    sock: socket.socket, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on ``sock`` (closing it after); (status, body)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: lab", "Connection: close", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = _read_all(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionError(f"not an HTTP answer: {response[:80]!r}")
    return int(status_line[1]), body


def sink_bytes(sock: socket.socket, total: int) -> int:
    """Send ``total`` bytes to a sink; return the count it acknowledged."""
    block = b"\x5a" * _CHUNK
    remaining = total
    while remaining > 0:
        n = min(remaining, len(block))
        sock.sendall(block[:n])
        remaining -= n
    sock.shutdown(socket.SHUT_WR)
    return int(_read_all(sock) or b"-1")


def source_bytes(sock: socket.socket, total: int) -> int:
    """Ask a source for ``total`` bytes; return how many arrived."""
    sock.sendall(f"{total}\n".encode())
    received = 0
    while data := sock.recv(_CHUNK):
        received += len(data)
    return received


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.apps", description=__doc__)
    parser.add_argument("app", choices=sorted(APPS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="::", help="default: IPv4 and IPv6")
    args = parser.parse_args(argv)
    server = TcpServer(listen(args.host, args.port), APPS[args.app])
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.start()
    print(f"{args.app} listening on {args.host}:{args.port}", flush=True)
    while not done.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
