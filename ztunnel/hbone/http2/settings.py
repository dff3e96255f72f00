"""What one sans-IO HTTP/2 connection advertises and enforces, and its abuse budgets.

:class:`H2Settings` holds the values Istio's ztunnel uses for windows and
frame sizes, plus one budget per kind of frame a peer can send cheaply and make
us work for (RFC 9113 section 10.5). :class:`Budget` is the token bucket behind
each of them: O(1) memory per connection, whatever the peer sends.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel.errors import ConfigError

__all__ = ["Budget", "H2Settings"]

MiB = 1 << 20
_MAX_WINDOW = (1 << 31) - 1


@dataclass(frozen=True, slots=True)
class H2Settings:
    """HTTP/2 settings and abuse limits for one connection.

    Every ``max_*_per_second`` budget allows a burst of one second's worth and
    refills continuously; a peer that spends past it gets
    GOAWAY(ENHANCE_YOUR_CALM).
    """

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
    # PING and SETTINGS frames.
    max_control_frames_per_second: int = 100
    # Frames that carry nothing (empty DATA without END_STREAM, PRIORITY, unknown
    # types).
    max_empty_frames_per_second: int = 1000
    # WINDOW_UPDATE frames. We send one per half window consumed, and so do the
    # common stacks; thousands per second is a flood, not flow control.
    max_window_updates_per_second: int = 5000
    # DATA frames with a payload under tiny_data_size bytes (END_STREAM frames
    # excepted): each costs as much to process as a full one.
    tiny_data_size: int = 64
    max_tiny_data_per_second: int = 10_000
    # Frames on streams that are already closed (in flight when we reset them,
    # or aimed at dead streams on purpose). Large DATA is not counted: its bytes
    # are bounded by the connection window like any other DATA.
    max_closed_stream_frames_per_second: int = 2000
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
        budgets = {
            "max_early_resets": self.max_early_resets,
            "max_control_frames_per_second": self.max_control_frames_per_second,
            "max_empty_frames_per_second": self.max_empty_frames_per_second,
            "max_window_updates_per_second": self.max_window_updates_per_second,
            "max_tiny_data_per_second": self.max_tiny_data_per_second,
            "max_closed_stream_frames_per_second": self.max_closed_stream_frames_per_second,
        }
        problems += [f"{name} {value} (at least 1)" for name, value in budgets.items() if value < 1]
        if self.early_reset_period <= 0:
            problems.append(f"early_reset_period {self.early_reset_period} (above 0)")
        if problems:
            raise ConfigError(
                "invalid HTTP/2 settings: " + ", ".join(problems),
                hint="the values in parentheses are the ranges allowed",
            )


class Budget:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` per second.

    :meth:`spend` takes one token and answers True once the bucket is empty,
    i.e. the peer sent more than ``burst`` at once or more than ``rate`` per
    second for long enough.
    """

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp: float | None = None

    def spend(self, now: float) -> bool:
        if self._stamp is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        self._tokens -= 1.0
        return self._tokens < 0.0
