"""The error family of :mod:`ztunnel.hbone`.

* :class:`ProtocolError` splits, as in h11/h2, into :class:`LocalProtocolError`
  (our own code asked for something HTTP/2 forbids, e.g. DATA on a closed
  stream) and :class:`RemoteProtocolError` (the peer broke the protocol; it
  carries the HTTP/2 error code that was sent in GOAWAY or RST_STREAM).
* :class:`HboneConnectError` is what a client sees when a tunnel cannot be
  opened: the TCP/TLS connection failed, the peer's identity was wrong, or the
  server answered the CONNECT with a non-200 status (:class:`ConnectRefused`).
* :class:`StreamClosedError` is raised by stream operations after the stream
  ended (reset by the peer, closed by policy, connection lost).
"""

from __future__ import annotations

from ztunnel.errors import ZtunnelError

__all__ = [
    "ConnectRefused",
    "HboneConnectError",
    "HboneError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "StreamClosedError",
    "StreamRefused",
]


class HboneError(ZtunnelError):
    """Base of every error :mod:`ztunnel.hbone` raises."""


class ProtocolError(HboneError):
    """An HTTP/2 protocol violation."""


class LocalProtocolError(ProtocolError):
    """Our side tried to do something the protocol or the connection state forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer violated HTTP/2; ``error_code`` is what we told it (RFC 9113 section 7)."""

    def __init__(self, message: str, error_code: int, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.error_code = error_code


class HboneConnectError(HboneError):
    """A tunnel to a destination could not be opened."""


class ConnectRefused(HboneConnectError):
    """The HBONE server answered CONNECT with ``status`` (400 bad authority,
    401 denied by policy, 503 destination unreachable...)."""

    def __init__(self, status: int, authority: str) -> None:
        hints = {
            400: "the server refused the request as malformed (authority must be the pod IP "
            "the connection was made to)",
            401: "the destination's authorization policy denies this source identity",
            503: "the destination node could not reach the pod; check the pod is running",
        }
        super().__init__(
            f"CONNECT {authority} was refused with status {status}",
            hint=hints.get(status, "see the destination ztunnel's access log"),
        )
        self.status = status
        self.authority = authority


class StreamRefused(HboneConnectError):
    """The server did not process the CONNECT (REFUSED_STREAM, or a GOAWAY below
    our stream id): it is safe to retry on another connection."""


class StreamClosedError(HboneError):
    """The HBONE stream is no longer usable."""
