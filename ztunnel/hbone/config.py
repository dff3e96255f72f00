"""Tunables of the HBONE IO layer, with the values Istio's ztunnel uses.

:class:`~ztunnel.hbone.http2.settings.H2Settings` is what the sans-IO
connection advertises and enforces (re-exported here); :class:`HboneConfig`
adds the IO side: timers, pool limits, buffer sizes, fairness between
connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .http2.settings import H2Settings

__all__ = ["H2Settings", "HboneConfig"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class HboneConfig:
    """Everything the HBONE client, pool and server need to know."""

    h2: H2Settings = field(default_factory=H2Settings)
    max_streams_per_connection: int = 100  # client pool: open a new connection when full
    pool_idle_timeout: float = 300.0  # release pooled connections idle this long
    server_idle_timeout: float = 600.0  # server closes connections without streams
    handshake_timeout: float = 10.0
    # After TLS: the peer's connection preface and first SETTINGS must have
    # arrived, and our SETTINGS must be acknowledged, within these (a peer
    # trickling the preface, or never acknowledging, holds a connection slot).
    preface_timeout: float = 5.0
    settings_ack_timeout: float = 5.0
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
    # Frames handled for one connection per event-loop turn; the rest waits for
    # the next turn (reading paused), so a flooding peer cannot monopolise the loop.
    max_frames_per_turn: int = 64
    # Give the heap back to the system after this many server connections closed
    # (0: never), heap_trim_delay seconds after the burst (see heap.py).
    heap_trim_after_closes: int = 256
    heap_trim_delay: float = 1.0
