"""Tunables of the HBONE layer, with the values Istio's ztunnel uses.

:class:`H2Settings` is what the sans-IO connection advertises and enforces;
:class:`HboneConfig` adds the IO side: timers, pool limits, buffer sizes.
:class:`RateWindow` is the small sliding-window counter behind the flood guards
(rapid reset, PING and SETTINGS floods, empty-frame floods).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ztunnel.errors import ConfigError

__all__ = ["H2Settings", "HboneConfig", "RateWindow"]

MiB = 1 << 20
_MAX_WINDOW = (1 << 31) - 1


@dataclass(frozen=True, slots=True)
class H2Settings:
    """HTTP/2 settings and abuse limits for one connection."""

    initial_stream_window: int = 4 * MiB
    connection_window: int = 16 * MiB
    max_frame_size: int = 1 * MiB  # what we accept; we send what the peer accepts
    max_concurrent_streams: int = 200  # streams the peer may open towards us
    max_header_list_size: int = 16 * 1024
    max_header_block: int = 16 * 1024  # compressed HEADERS + CONTINUATION bytes
    max_continuations: int = 8
    header_table_size: int = 4096
    # Rapid Reset (CVE-2023-44487): peer resets of streams it opened less than
    # early_reset_age seconds ago (or before we answered), plus streams refused
    # for exceeding max_concurrent_streams; more than max_early_resets within
    # early_reset_period gets GOAWAY(ENHANCE_YOUR_CALM).
    early_reset_age: float = 1.0
    max_early_resets: int = 100
    early_reset_period: float = 10.0
    # PING and SETTINGS frames per second before GOAWAY(ENHANCE_YOUR_CALM).
    max_control_frames_per_second: int = 100
    # Frames that carry nothing (empty DATA without END_STREAM, PRIORITY, unknown
    # types) per second: a CPU-burning flood otherwise.
    max_empty_frames_per_second: int = 1000
    # Streams reset recently, whose in-flight frames are ignored rather than
    # answered with another RST_STREAM.
    reset_memory: int = 1024

    def __post_init__(self) -> None:
        problems = []
        if not 65_535 <= self.initial_stream_window <= _MAX_WINDOW:
            problems.append(f"initial_stream_window {self.initial_stream_window} (65535..2^31-1)")
        if not 65_535 <= self.connection_window <= _MAX_WINDOW:
            problems.append(f"connection_window {self.connection_window} (65535..2^31-1)")
        if not 16_384 <= self.max_frame_size <= (1 << 24) - 1:
            problems.append(f"max_frame_size {self.max_frame_size} (16384..2^24-1)")
        if self.max_concurrent_streams < 1:
            problems.append(f"max_concurrent_streams {self.max_concurrent_streams} (at least 1)")
        if problems:
            raise ConfigError(
                "invalid HTTP/2 settings: " + ", ".join(problems),
                hint="the values in parentheses are the ranges RFC 9113 allows",
            )


@dataclass(frozen=True, slots=True)
class HboneConfig:
    """Everything the HBONE client, pool and server need to know."""

    h2: H2Settings = field(default_factory=H2Settings)
    max_streams_per_connection: int = 100  # client pool: open a new connection when full
    pool_idle_timeout: float = 300.0  # release pooled connections idle this long
    server_idle_timeout: float = 600.0  # server closes connections without streams
    handshake_timeout: float = 10.0
    stream_open_timeout: float = 15.0  # CONNECT until the 200 (server dials the pod meanwhile)
    keepalive_interval: float = 30.0  # PING after this long without a frame from the peer
    keepalive_timeout: float = 10.0  # close if the PING is not acknowledged in time
    tcp_read_size: int = 256 * 1024
    # uvloop decrypts at most one 256 KiB read of ciphertext per callback, so a
    # larger plaintext buffer is never filled; the same size as tcp_read_size
    # lets both directions share one buffer pool.
    tls_read_size: int = 256 * 1024
    shutdown_grace: float = 10.0
    # A connection whose TLS write backlog passes this is aborted (a peer that
    # stopped reading while still sending PINGs or HEADERS to answer).
    max_write_backlog: int = 32 * MiB


class RateWindow:
    """Counts events in a sliding time window; ``hit`` says when the limit is passed.

    Memory is bounded by ``limit + 1`` timestamps.
    """

    __slots__ = ("_limit", "_period", "_times")

    def __init__(self, limit: int, period: float) -> None:
        self._limit = limit
        self._period = period
        self._times: deque[float] = deque(maxlen=limit + 1)

    def hit(self, now: float) -> bool:
        times = self._times
        times.append(now)
        if len(times) <= self._limit:
            return False
        return now - times[0] < self._period
