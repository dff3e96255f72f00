"""Watching what crosses the lab underlay, to prove that mesh traffic is encrypted.

:class:`UnderlayCapture` opens an AF_PACKET socket on the underlay bridge
inside the underlay namespace. The bridge is put in promiscuous mode, which
makes the bridge pass every frame it switches between node ports up to its
own device as well, so one socket sees each underlay frame exactly once (and
the controller's own traffic). A background thread stores frames up to a byte
cap; tests then ask whether a plaintext marker ever crossed, which TCP ports
carried traffic and how many TLS records were seen.

:meth:`UnderlayCapture.write_pcap` saves what was captured for Wireshark, and
:func:`summarize_pcap` gives the demo tshark's conversation table. (Running
tshark live on the bridge is not offered: libpcap hands packets over in ring
blocks retired by a timer, and stopping tshark loses the block still open, so
the last packets of a short exchange silently go missing.)
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from lab.errors import LabError
from lab.netns import in_netns

if TYPE_CHECKING:
    from lab.topology import Topology

__all__ = [
    "DEFAULT_CAPTURE_LIMIT",
    "TcpSegment",
    "UnderlayCapture",
    "parse_tcp_frame",
    "summarize_pcap",
    "tls_records",
]

DEFAULT_CAPTURE_LIMIT = 64 * 1024 * 1024
_ETH_P_ALL = 0x0003
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_SOL_PACKET = 263
_PACKET_ADD_MEMBERSHIP = 1
_PACKET_MR_PROMISC = 1
_TLS_TYPES = frozenset({20, 21, 22, 23})  # change_cipher_spec, alert, handshake, data
_TLS_MAX_RECORD = 2**14 + 2048


@dataclass(frozen=True)
class TcpSegment:
    """One TCP segment (IPv4 or IPv6) seen on the wire."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    flags: int
    payload: bytes

    @property
    def syn(self) -> bool:
        return bool(self.flags & 0x02) and not self.flags & 0x10


def _parse_tcp6_frame(frame: bytes) -> TcpSegment | None:
    """IPv6/TCP with no extension headers (all the lab's stacks send)."""
    ip = 14
    if len(frame) < ip + 40 + 20 or frame[ip] >> 4 != 6 or frame[ip + 6] != 6:
        return None
    payload_len = struct.unpack_from("!H", frame, ip + 4)[0]
    tcp = ip + 40
    sport, dport, seq = struct.unpack_from("!HHI", frame, tcp)
    offset = (frame[tcp + 12] >> 4) * 4
    end = min(len(frame), tcp + payload_len) if payload_len else len(frame)  # 0 under GSO
    return TcpSegment(
        src=socket.inet_ntop(socket.AF_INET6, frame[ip + 8 : ip + 24]),
        dst=socket.inet_ntop(socket.AF_INET6, frame[ip + 24 : ip + 40]),
        sport=sport,
        dport=dport,
        seq=seq,
        flags=frame[tcp + 13],
        payload=bytes(frame[tcp + offset : end]),
    )


def parse_tcp_frame(frame: bytes) -> TcpSegment | None:
    """Decode an Ethernet frame carrying IPv4/TCP or IPv6/TCP; None for anything else."""
    if len(frame) >= 14 and struct.unpack_from("!H", frame, 12)[0] == _ETH_P_IPV6:
        return _parse_tcp6_frame(frame)
    if len(frame) < 14 + 20 + 20 or struct.unpack_from("!H", frame, 12)[0] != _ETH_P_IP:
        return None
    ip = 14
    ihl = (frame[ip] & 0x0F) * 4
    if frame[ip] >> 4 != 4 or ihl < 20 or frame[ip + 9] != 6:
        return None
    total = struct.unpack_from("!H", frame, ip + 2)[0]
    tcp = ip + ihl
    if len(frame) < tcp + 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", frame, tcp)
    offset = (frame[tcp + 12] >> 4) * 4
    end = min(len(frame), ip + total) if total else len(frame)  # 0 under GSO
    return TcpSegment(
        src=socket.inet_ntoa(frame[ip + 12 : ip + 16]),
        dst=socket.inet_ntoa(frame[ip + 16 : ip + 20]),
        sport=sport,
        dport=dport,
        seq=seq,
        flags=frame[tcp + 13],
        payload=bytes(frame[tcp + offset : end]),
    )


def tls_records(stream: bytes) -> list[tuple[int, int]]:
    """(content type, length) of the TLS records a TCP byte stream starts with."""
    records: list[tuple[int, int]] = []
    pos = 0
    while pos + 5 <= len(stream):
        ctype, major, minor, length = struct.unpack_from("!BBBH", stream, pos)
        if ctype not in _TLS_TYPES or major != 3 or minor > 4 or length > _TLS_MAX_RECORD:
            break
        records.append((ctype, length))
        pos += 5 + length
    return records


class UnderlayCapture:
    """Frames crossing the underlay bridge, collected in the background."""

    def __init__(
        self,
        topo: Topology,
        interface: str | None = None,
        *,
        limit: int = DEFAULT_CAPTURE_LIMIT,
    ) -> None:
        self.interface = interface or topo.bridge
        self.netns = topo.underlay_netns
        self.limit = limit
        self._frames: list[tuple[float, bytes]] = []
        self._bytes = 0
        self.dropped = 0  # frames not kept because the byte cap was reached
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> UnderlayCapture:
        """Open the socket (frames from now on are captured) and start the reader."""
        with in_netns(self.netns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        try:
            with in_netns(self.netns):
                ifindex = socket.if_nametoindex(self.interface)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            sock.bind((self.interface, _ETH_P_ALL))
            # Promiscuous: the bridge then passes up frames it switches between
            # ports too, not only those addressed to itself.
            mreq = struct.pack("iHH8s", ifindex, _PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(_SOL_PACKET, _PACKET_ADD_MEMBERSHIP, mreq)
            sock.settimeout(0.05)
        except OSError as exc:
            sock.close()
            raise LabError(
                f"cannot capture on {self.interface} in {self.netns}: {exc}",
                hint="capturing needs root and an existing interface in the underlay namespace",
            ) from exc
        self._sock = sock
        self._thread = threading.Thread(target=self._read_loop, daemon=True)
        self._thread.start()
        return self

    def _read_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                frame = self._sock.recv(262144)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if self._bytes + len(frame) > self.limit:
                    self.dropped += 1
                    continue
                self._frames.append((time.time(), frame))
                self._bytes += len(frame)

    def stop(self) -> None:
        """Stop reading and close the socket (idempotent); collected frames stay."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> UnderlayCapture:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- queries -----------------------------------------------------------

    @property
    def frames(self) -> list[bytes]:
        with self._lock:
            return [frame for _, frame in self._frames]

    def write_pcap(self, path: Path) -> Path:
        """Save the frames captured so far as a classic pcap file (Ethernet)."""
        with self._lock:
            frames = list(self._frames)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
            for ts, frame in frames:
                sec = int(ts)
                usec = int((ts - sec) * 1_000_000)
                out.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)))
                out.write(frame)
        return path

    @property
    def captured_bytes(self) -> int:
        return self._bytes

    def segments(self) -> list[TcpSegment]:
        return [s for f in self.frames if (s := parse_tcp_frame(f)) is not None]

    def streams(self) -> dict[tuple[str, int, str, int], bytes]:
        """Payload of each direction of each TCP flow, in sequence order, retransmits once."""
        flows: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
        for seg in self.segments():
            if seg.payload:
                parts = flows.setdefault((seg.src, seg.sport, seg.dst, seg.dport), {})
                parts.setdefault(seg.seq, seg.payload)
        # Sequence numbers are relative to the first one seen (they may wrap).
        out: dict[tuple[str, int, str, int], bytes] = {}
        for key, parts in flows.items():
            first = next(iter(parts))
            ordered = sorted(parts.items(), key=lambda kv: (kv[0] - first) % 2**32)
            out[key] = b"".join(p for _, p in ordered)
        return out

    def contains(self, marker: bytes) -> bool:
        """Did ``marker`` cross in clear, in any frame or split across a flow's segments?"""
        if any(marker in f for f in self.frames):
            return True
        return any(marker in s for s in self.streams().values())

    def tcp_ports_seen(self) -> set[int]:
        """Every TCP port (source or destination) in a captured segment."""
        return {p for s in self.segments() for p in (s.sport, s.dport)}

    def tcp_connection_ports(self) -> set[int]:
        """Destination ports of TCP connections opened (SYNs) while capturing."""
        return {s.dport for s in self.segments() if s.syn}

    def tls_records_seen(self) -> int:
        """TLS records found by walking each captured flow from its first payload byte."""
        return sum(len(tls_records(s)) for s in self.streams().values())

    def wait_for(self, predicate: Callable[[UnderlayCapture], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate(self)`` until it holds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)


def summarize_pcap(pcap: Path, *, timeout: float = 30.0) -> str:
    """tshark's TCP conversation table and a per-protocol hierarchy for ``pcap``."""
    try:
        done = subprocess.run(
            ["tshark", "-r", str(pcap), "-q", "-z", "conv,tcp", "-z", "io,phs"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"tshark could not read {pcap}: {exc}", hint="is tshark installed?") from exc
    if done.returncode != 0:
        raise LabError(f"tshark could not read {pcap}: {done.stderr.strip()}")
    return done.stdout
