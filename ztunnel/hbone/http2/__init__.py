"""The sans-IO HTTP/2 core of HBONE: bytes and calls in, bytes and events out.

Nothing here touches a socket or the event loop; the IO layer
(:mod:`ztunnel.hbone.endpoint` and the client and server built on it) drives
it. The pieces, one concern each:

* :mod:`~ztunnel.hbone.http2.connection`: :class:`H2Connection`, one
  connection: the send API, the queries, how it ends; it holds the next three;
* :mod:`~ztunnel.hbone.http2.receive`: :class:`FrameReceiver`, the meaning of
  every received frame and the abuse budgets;
* :mod:`~ztunnel.hbone.http2.flow`: :class:`FlowControl`, the windows both
  ways and WINDOW_UPDATE batching;
* :mod:`~ztunnel.hbone.http2.streams`: the stream state table and
  :class:`StreamTable`, the live streams and the ids used;
* :mod:`~ztunnel.hbone.http2.decoder`: :class:`FrameDecoder`, bytes to frames;
* :mod:`~ztunnel.hbone.http2.blocks`: HEADERS/CONTINUATION assembly and HPACK
  decoding; :mod:`~ztunnel.hbone.http2.hpack_encoder` encodes without a table;
* :mod:`~ztunnel.hbone.http2.frames`: wire constants and frame encoders;
* :mod:`~ztunnel.hbone.http2.headers`: request/response header validation;
* :mod:`~ztunnel.hbone.http2.settings`: :class:`H2Settings` and the abuse budgets;
* :mod:`~ztunnel.hbone.http2.events`: what the connection reports.

Only the CONNECT subset HBONE needs is implemented; docs/adr/0001 says why
this is written by hand rather than taken from the ``h2`` library.
"""

from __future__ import annotations

from .connection import H2Connection, Role
from .decoder import FrameDecoder
from .settings import Budget, H2Settings

__all__ = ["Budget", "FrameDecoder", "H2Connection", "H2Settings", "Role"]
