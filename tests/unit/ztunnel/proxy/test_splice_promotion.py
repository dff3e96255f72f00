"""When ``auto`` hands a relayed same-node connection to the kernel splice."""

from __future__ import annotations

import pytest

from ztunnel.config import SpliceMode, ZtunnelConfig, config_from_args
from ztunnel.errors import ConfigError
from ztunnel.proxy.promotion import (
    BULK_BURST,
    MAX_MESSAGE,
    PROMOTE_AFTER_TURNS,
    Activity,
    Interactivity,
    Promotion,
    observe,
    promotion_decision,
)

C, S = True, False  # read from the client, from the server


def feed(reads: list[tuple[bool, int]]) -> Activity:
    activity = Activity()
    for from_client, nbytes in reads:
        activity = observe(activity, from_client, nbytes)
    return activity


def ping_pong(turns: int, size: int = 64) -> list[tuple[bool, int]]:
    """``turns`` direction flips of ``size``-byte messages, starting with the client."""
    return [(i % 2 == 0, size) for i in range(turns + 1)]


@pytest.mark.parametrize(
    ("reads", "expected"),
    [
        ([], Activity()),
        ([(C, 10)], Activity(0, C, 10, False, False)),
        ([(C, 10), (C, 5)], Activity(0, C, 15, False, False)),
        ([(C, 10), (S, 7)], Activity(1, S, 7, True, False)),
        ([(C, 10), (S, 7), (S, 1)], Activity(1, S, 8, False, False)),
        # A large burst ends a turn that is not small: the count starts again.
        ([(C, 10), (S, 7), (C, MAX_MESSAGE + 1), (S, 1)], Activity(0, S, 1, True, False)),
        ([(C, MAX_MESSAGE), (S, 1)], Activity(1, S, 1, True, False)),
        # Above the bulk limit, in one read or many: bulk for good.
        ([(C, BULK_BURST + 1)], Activity(0, C, BULK_BURST + 1, False, True)),
        ([(C, BULK_BURST), (C, 1), (S, 1)], Activity(0, S, 1, True, True)),
        # The server speaks first (a banner): symmetric.
        ([(S, 20), (C, 4)], Activity(1, C, 4, True, False)),
    ],
)
def test_observe(reads: list[tuple[bool, int]], expected: Activity) -> None:
    assert feed(reads) == expected


@pytest.mark.parametrize(
    ("reads", "backlog", "eof", "expected"),
    [
        ([], 0, False, Promotion.WAIT),
        (ping_pong(PROMOTE_AFTER_TURNS - 1), 0, False, Promotion.WAIT),
        (ping_pong(PROMOTE_AFTER_TURNS), 0, False, Promotion.PROMOTE),
        (ping_pong(PROMOTE_AFTER_TURNS + 3), 0, False, Promotion.PROMOTE),
        # Only at the start of a burst, never in its middle.
        ([*ping_pong(PROMOTE_AFTER_TURNS), (C, 1)], 0, False, Promotion.WAIT),
        # Bytes still in the relay's buffers: wait for a quiet moment.
        (ping_pong(PROMOTE_AFTER_TURNS), 1, False, Promotion.WAIT),
        # Half-closed: the relay has forwarded the FIN; it keeps the connection.
        (ping_pong(PROMOTE_AFTER_TURNS), 0, True, Promotion.NEVER),
        ([(C, 1)], 0, True, Promotion.NEVER),
        # The burst that opens the turn must be a message too.
        (
            [
                *ping_pong(PROMOTE_AFTER_TURNS - 1),
                (C if PROMOTE_AFTER_TURNS % 2 == 0 else S, MAX_MESSAGE + 1),
            ],
            0,
            False,
            Promotion.WAIT,
        ),
        # Large messages now and then reset the count.
        (ping_pong(PROMOTE_AFTER_TURNS, size=MAX_MESSAGE + 1), 0, False, Promotion.WAIT),
        # A one-way stream never turns; a bulk transfer never promotes.
        ([(C, 64)] * 1000, 0, False, Promotion.WAIT),
        ([(C, BULK_BURST + 1)], 0, False, Promotion.NEVER),
        ([(C, 256 << 10)] * 5 + ping_pong(PROMOTE_AFTER_TURNS + 1), 0, False, Promotion.NEVER),
    ],
)
def test_promotion_decision(
    reads: list[tuple[bool, int]], backlog: int, eof: bool, expected: Promotion
) -> None:
    assert promotion_decision(feed(reads), backlog=backlog, eof=eof) is expected


@pytest.mark.parametrize(
    ("reads", "backlog", "eof", "promote", "pipe", "expected"),
    [
        # Bulk goes to the splice(2) relay when allowed, whatever the backlog
        # (the relay drains it before handing over).
        ([(C, BULK_BURST + 1)], 0, False, True, True, Promotion.BULK),
        ([(S, BULK_BURST + 1)], 5 << 20, False, True, True, Promotion.BULK),
        ([(C, 256 << 10)] * 5, 0, False, False, True, Promotion.BULK),
        ([(C, BULK_BURST + 1)], 0, False, True, False, Promotion.NEVER),
        # At the limit, not above it: still waiting.
        ([(C, BULK_BURST)], 0, False, True, True, Promotion.WAIT),
        # Half-closed: the relay keeps it (it has forwarded the FIN already).
        ([(C, BULK_BURST + 1)], 0, True, True, True, Promotion.NEVER),
        # Without pins there is no sk_skb splice: a conversation stays relayed.
        (ping_pong(PROMOTE_AFTER_TURNS), 0, False, False, True, Promotion.WAIT),
        (ping_pong(PROMOTE_AFTER_TURNS), 0, False, True, True, Promotion.PROMOTE),
        # A conversation that later carries a transfer moves to the pipes.
        ([*ping_pong(2), (C, BULK_BURST + 1)], 0, False, True, True, Promotion.BULK),
    ],
)
def test_bulk_goes_to_the_splice2_relay(
    reads: list[tuple[bool, int]],
    backlog: int,
    eof: bool,
    promote: bool,
    pipe: bool,
    expected: Promotion,
) -> None:
    decision = promotion_decision(feed(reads), backlog=backlog, eof=eof, promote=promote, pipe=pipe)
    assert decision is expected


def test_interactivity_promotes_a_conversation_once_it_has_enough_turns() -> None:
    watch = Interactivity()
    decisions = [
        watch.read(from_client, nbytes, backlog=0, eof=False)
        for from_client, nbytes in ping_pong(PROMOTE_AFTER_TURNS)
    ]
    assert decisions == [Promotion.WAIT] * PROMOTE_AFTER_TURNS + [Promotion.PROMOTE]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ({}, {}, SpliceMode.AUTO),  # bulk moves to the splice(2) relay, RR to sk_skb
        ({}, {"VEIL_SAME_NODE_SPLICE": "off"}, SpliceMode.OFF),
        ({"same_node_splice": "Always"}, {"VEIL_SAME_NODE_SPLICE": "off"}, SpliceMode.ALWAYS),
    ],
)
def test_the_setting(args: dict[str, str], env: dict[str, str], expected: SpliceMode) -> None:
    config = config_from_args({"node_name": "n1", **args}, env)
    assert config.same_node_splice is expected


def test_the_setting_names_itself_when_wrong_and_survives_the_worker_channel() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_args({"node_name": "n1"}, {"VEIL_SAME_NODE_SPLICE": "fast"})
    assert "VEIL_SAME_NODE_SPLICE" in str(e.value) and "auto, always, off" in str(e.value)
    # Workers receive the config as JSON: the plain string becomes the mode again.
    assert ZtunnelConfig("n1", same_node_splice="auto").same_node_splice is SpliceMode.AUTO  # type: ignore[arg-type]
