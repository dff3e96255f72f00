"""Events the sans-IO HTTP/2 connection reports to its IO driver (frozen values).

:class:`DataReceived` carries a ``memoryview`` into the caller's receive buffer:
it is only valid until the driver returns from handling the batch of events,
so a driver that keeps the bytes for later must copy them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "PingAcked",
    "RemoteSettingsChanged",
    "RequestReceived",
    "ResponseReceived",
    "StreamEnded",
    "StreamReset",
    "WindowUpdated",
]

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A peer-initiated stream opened with a (structurally valid) request."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """The final (non-1xx) response to a request we sent."""

    stream_id: int
    status: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload bytes of a DATA frame (possibly a part of one). Acknowledge them with
    :meth:`H2Connection.acknowledge_received_data` once they were delivered."""

    stream_id: int
    data: memoryview = field(compare=False)


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was reset: by the peer (``remote``) or by us for a stream error."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """Send window grew on ``stream_id`` (0: the connection, i.e. possibly every stream)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class RemoteSettingsChanged:
    """The peer's SETTINGS were applied; the values now in force."""

    max_concurrent_streams: int
    initial_window_size: int
    max_frame_size: int


@dataclass(frozen=True, slots=True)
class PingAcked:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """No new streams: the peer sent GOAWAY (``remote``), or we did after a
    connection error or a local close. ``last_stream_id`` is the highest stream
    the sender of the GOAWAY may have processed; ``fatal`` means no stream can
    continue (any error code, or our own close)."""

    error_code: int
    last_stream_id: int
    remote: bool
    fatal: bool
    message: str = ""


Event = (
    RequestReceived
    | ResponseReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | RemoteSettingsChanged
    | PingAcked
    | ConnectionTerminated
)
