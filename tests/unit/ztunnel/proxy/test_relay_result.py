"""One result type for every relay, counted in client terms whichever side the
local socket is on (no sockets: HBONE results are plain values)."""

from __future__ import annotations

import pytest

from ztunnel.hbone import CloseReason
from ztunnel.hbone import RelayResult as TunnelResult
from ztunnel.proxy.errors import FLAG_DOWNSTREAM_CLOSED, FLAG_UPSTREAM_CLOSED
from ztunnel.proxy.relay import RelayResult, tunnel_result

# bytes_up: read from the local socket into the tunnel; bytes_down: the reverse.
DONE = TunnelResult(bytes_up=11, bytes_down=22, reason=CloseReason.COMPLETED)


def test_outbound_local_socket_is_the_client() -> None:
    assert tunnel_result(DONE, local_is_client=True) == RelayResult(from_client=11, to_client=22)


def test_inbound_local_socket_is_the_pod() -> None:
    assert tunnel_result(DONE, local_is_client=False) == RelayResult(from_client=22, to_client=11)


@pytest.mark.parametrize(
    ("reason", "flags"),
    [
        (CloseReason.PEER_RESET, FLAG_UPSTREAM_CLOSED),
        (CloseReason.CONNECTION_LOST, FLAG_UPSTREAM_CLOSED),
        (CloseReason.SHUTDOWN, FLAG_DOWNSTREAM_CLOSED),
        (CloseReason.CANCELLED, None),
    ],
)
def test_an_unfinished_tunnel_reports_why(reason: CloseReason, flags: str | None) -> None:
    r = tunnel_result(TunnelResult(1, 2, reason, "detail"), local_is_client=True)
    assert (r.from_client, r.to_client, r.flags) == (1, 2, flags)
    assert r.error == f"{reason.value}: detail"
