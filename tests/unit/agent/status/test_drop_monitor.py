"""The agent's drop stream: filters, documents, fan-out with bounded queues."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address
from typing import Any

from agent.bpf.codes import DropReason
from agent.bpf.events import DropEvent, DropProgram
from agent.cli.commands import monitor_line, monitor_query
from agent.status.monitor import DropFilter, DropMonitor, drop_event_dict

ROWS = [
    {"workload": "shop/client", "namespace": "shop", "ifindex": 7, "ip": "10.0.0.9",
     "veth": "vh7"},
    {"workload": "prod/db", "namespace": "prod", "ifindex": 8, "ip": "10.0.0.8", "veth": "vh8"},
]  # fmt: skip


def event(ifindex: int = 7, suppressed: int = 0, sport: int = 40001) -> DropEvent:
    return DropEvent(
        monotonic_ns=1, ifindex=ifindex, reason=DropReason.SPOOFED_SOURCE,
        program=DropProgram.POD_INGRESS, family=2, protocol=6,
        src=IPv4Address("10.0.0.99"), dst=IPv4Address("10.0.1.1"), sport=sport, dport=80,
        suppressed=suppressed,
    )  # fmt: skip


def test_document_names_pod_reason_and_tuple() -> None:
    doc = drop_event_dict(event(), ROWS[0], wall=0.0)
    assert doc["time"] == "1970-01-01T00:00:00.000000Z"
    assert (doc["type"], doc["pod"], doc["namespace"], doc["veth"]) == (
        "drop", "shop/client", "shop", "vh7",
    )  # fmt: skip
    assert (doc["reason"], doc["src"], doc["dst"]) == (
        "spoofed_source", "10.0.0.99:40001", "10.0.1.1:80",
    )  # fmt: skip
    line = monitor_line(doc)
    assert "spoofed_source pod=shop/client 10.0.0.99:40001 -> 10.0.1.1:80 tcp (pod_ingress)" in line
    unknown = drop_event_dict(event(ifindex=99), None, wall=0.0)
    assert unknown["pod"] is None and "pod=99" in monitor_line(unknown)


def test_filters() -> None:
    doc = drop_event_dict(event(), ROWS[0], wall=0.0)
    lost = {"type": "lost", "count": 3}
    cases: list[tuple[Mapping[str, str], bool]] = [
        ({}, True),
        ({"namespace": "shop"}, True),
        ({"namespace": "prod"}, False),
        ({"pod": "client"}, True),
        ({"pod": "shop/client"}, True),
        ({"pod": "prod/client"}, False),
        ({"namespace": "prod", "pod": "client"}, False),
        ({"workload": "client", "reason": "spoofed_source"}, True),
        ({"reason": "no_listener"}, False),
    ]
    for query, want in cases:
        f = DropFilter.from_query(query)
        assert f.matches(doc) is want, query
        assert f.matches(lost)  # about the stream: always shown
    assert not DropFilter(pod="client").matches(drop_event_dict(event(99), None, wall=0.0))


def test_monitor_query_carries_the_filters() -> None:
    args = argparse.Namespace(namespace="shop", workload="client", reason=None)
    assert monitor_query(args) == "/monitor?follow=1&namespace=shop&pod=client"
    assert monitor_query(argparse.Namespace()) == "/monitor?follow=1"


async def _collect(it: Any, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async for doc in it:
        out.append(doc)
        if len(out) == n:
            break
    return out


async def test_fan_out_filters_and_tells_a_slow_reader_what_it_lost() -> None:
    reads = 0

    async def read_pods() -> Sequence[Mapping[str, Any]]:
        nonlocal reads
        reads += 1
        return ROWS

    hub = DropMonitor(None, read_pods, queue_size=2, fallback=False)
    shop = hub.subscribe({"namespace": "shop"})
    prod = hub.subscribe({"namespace": "prod"})
    assert (await anext(shop))["type"] == "subscribed"
    assert (await anext(prod))["type"] == "subscribed"
    for i in range(5):  # shop's queue holds 2: three are lost for it
        await hub.handle(event(sport=i))
    await hub.handle(event(ifindex=8, suppressed=4))  # the kernel swallowed 4 before it
    got = await _collect(shop, 3)
    assert [d.get("src_port") for d in got[:2]] == [0, 1]
    # three drops and the rate-limit notice did not fit: told after what it got
    assert got[2] == {**got[2], "type": "lost", "count": 4, "why": "this reader was too slow"}
    got = await _collect(prod, 2)
    assert got[0]["type"] == "lost"  # rate-limit news reaches every subscriber
    assert got[1]["pod"] == "prod/db"
    assert hub.lost == 4 and reads == 1  # the pod index was read once
    await shop.aclose()
    await prod.aclose()
    await hub.handle(event())  # no subscribers: nothing queued, nothing read
    assert reads == 1
    await hub.close()


async def test_heartbeat_when_idle() -> None:
    async def read_pods() -> Sequence[Mapping[str, Any]]:
        return ()

    hub = DropMonitor(None, read_pods, heartbeat=0.01, fallback=False)
    sub = hub.subscribe({})
    got = await asyncio.wait_for(_collect(sub, 2), 5.0)
    assert [d["type"] for d in got] == ["subscribed", "heartbeat"]
    await sub.aclose()
