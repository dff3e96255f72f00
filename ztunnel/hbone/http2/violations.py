"""Internal signals for a peer's protocol violation, raised and caught inside the core.

They never leave :class:`~ztunnel.hbone.http2.connection.H2Connection`: a
:class:`ConnError` becomes GOAWAY(code) and a final ``ConnectionTerminated``
event, a :class:`StreamError` becomes RST_STREAM(code) and ``StreamReset``
(RFC 9113 section 5.4).
"""

from __future__ import annotations

__all__ = ["ConnError", "StreamError"]


class ConnError(Exception):
    """The peer caused a connection error; becomes GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamError(Exception):
    """The peer caused a stream error; becomes RST_STREAM(code)."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code
