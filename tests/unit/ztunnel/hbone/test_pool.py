"""The pool's pure connection choice, table-driven."""

from __future__ import annotations

import pytest

from ztunnel.hbone.pool import ConnectionView, pick_connection


def view(
    active: int = 0,
    reserved: int = 0,
    *,
    usable: bool = True,
    limit: int = 1000,
    expired: bool = False,
) -> ConnectionView:
    return ConnectionView(
        usable=usable, active=active, reserved=reserved, peer_limit=limit, cert_expired=expired
    )


@pytest.mark.parametrize(
    ("conns", "expected"),
    [
        ([], None),
        ([view()], 0),
        ([view(100)], None),  # full at 100 streams per connection
        ([view(99, 1)], None),  # reservations count
        ([view(99)], 0),
        ([view(10), view(50)], 1),  # the busiest with room: idle ones drain
        ([view(50, usable=False), view(10)], 1),  # going away / closing
        ([view(5, limit=5), view(1)], 1),  # the server's own stream limit
        ([view(expired=True)], None),  # expired client certificate
        ([view(100), view(100), view(3)], 2),
    ],
)
def test_pick_connection(conns: list[ConnectionView], expected: int | None) -> None:
    assert pick_connection(conns, 100) == expected
