"""`veil controller run` end to end: join with tokens, watch, edit the registry file."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time

import pytest

from controller.api.errors import ApiError
from controller.api.model import ResourceType, Workload

from .conftest import RunningController, Watcher, example_doc

WL = ResourceType.WORKLOAD


def with_workload(
    doc: dict[str, object], name: str, ip: str, node: str = "node-a"
) -> dict[str, object]:
    new = copy.deepcopy(doc)
    workloads = new["workloads"]
    assert isinstance(workloads, list)
    workloads.append(
        {"name": name, "namespace": "shop", "serviceAccount": name, "node": node, "ips": [ip]}
    )
    return new


async def wait_for_stderr(ctrl: RunningController, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        err = ctrl.stderr()
        if text in err:
            return err
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} not in controller output:\n{ctrl.stderr()}")


async def test_startup_line_names_listeners_trust_domain_ca_and_registry(
    controller: RunningController,
) -> None:
    line = controller.startup_line
    assert "trust domain cluster.local" in line
    assert "CA sha256:" in line
    assert "7 workloads (3 enrolled) on 2 nodes" in line  # examples/registry.yaml
    assert await controller.health() == 1  # SERVING


async def test_snapshot_then_deltas_from_file_edits(controller: RunningController) -> None:
    creds = await controller.join("node-a")
    watch = await Watcher.open(creds)
    try:
        snap = await watch.next()
        assert snap.snapshot and snap.trust_bundle is not None
        assert (WL, "shop/checkout") in watch.held and (WL, "shop/payments") in watch.held
        assert watch.bundle == tuple(creds.trust_bundle_pem)

        doc = example_doc()
        controller.write_registry(with_workload(doc, "cart", "10.244.1.20"))
        delta = await watch.next()
        assert not delta.snapshot and delta.version > snap.version
        assert [r.key for r in delta.upserts] == ["shop/cart"] and delta.removals == ()
        cart = delta.upserts[0]
        assert isinstance(cart, Workload) and cart.enrolled and cart.ips == ("10.244.1.20",)

        controller.write_registry(doc)  # back to the example: cart is removed
        delta = await watch.next()
        assert delta.upserts == () and delta.removals == ((WL, "shop/cart"),)
    finally:
        await watch.close()


async def test_resume_after_disconnect_gets_only_what_changed(
    controller: RunningController,
) -> None:
    creds = await controller.join("node-a")
    watch = await Watcher.open(creds)
    try:
        await watch.next()
        held, epoch, version = dict(watch.held), watch.epoch, watch.version
    finally:
        await watch.close()

    doc = with_workload(example_doc(), "cart", "10.244.1.20")
    doc["workloads"] = [w for w in doc["workloads"] if w["name"] != "other"]  # type: ignore[union-attr,index]
    controller.write_registry(doc)
    await wait_for_stderr(controller, "registry reloaded")

    resumed = await Watcher.open(creds, epoch, version)
    resumed.held = held
    try:
        first = await resumed.next()
        assert not first.snapshot and first.version > version
        assert [r.key for r in first.upserts] == ["shop/cart"]
        assert first.removals == ((WL, "shop/other"),)
        assert first.trust_bundle is None  # unchanged since the node's version

        fresh = await Watcher.open(creds)
        try:
            await fresh.next()
            assert fresh.held == resumed.held  # the resumed view equals a fresh snapshot
        finally:
            await fresh.close()
    finally:
        await resumed.close()

    # Another epoch (e.g. a previous controller process) gets a snapshot.
    other = await Watcher.open(creds, "0123456789abcdef", version)
    try:
        assert (await other.next()).snapshot
    finally:
        await other.close()


async def test_two_watchers_see_the_same_change_and_types_filter(
    controller: RunningController,
) -> None:
    a = await Watcher.open(await controller.join("node-a"))
    b = await Watcher.open(
        await controller.join("node-b"), types=(ResourceType.AUTHORIZATION_POLICY,)
    )
    try:
        await a.next()
        snap_b = await b.next()
        assert {type(r).__name__ for r in snap_b.upserts} == {"AuthorizationPolicy"}

        doc = example_doc()
        doc["authorizationPolicies"][0]["spec"]["action"] = "DENY"  # type: ignore[index]
        controller.write_registry(doc)
        ua, ub = await a.next(), await b.next()
        assert ua.version == ub.version
        assert (
            [r.key for r in ua.upserts]
            == [r.key for r in ub.upserts]
            == ["shop/payments-allow-checkout"]
        )
    finally:
        await a.close()
        await b.close()


async def test_broken_edit_keeps_previous_state_and_error_is_visible(
    controller: RunningController,
) -> None:
    watch = await Watcher.open(await controller.join("node-a"))
    try:
        await watch.next()
        before = dict(watch.held)
        doc = example_doc()
        doc["workloads"][0]["ips"] = ["10.244.1"]  # type: ignore[index]
        controller.write_registry(doc)
        err = await wait_for_stderr(controller, "is not an IP address")
        assert (
            'workloads[0] (shop/checkout): field "ips[0]": "10.244.1" is not an IP address' in err
        )
        assert "still serving the previous registry" in err
        with pytest.raises(TimeoutError):
            await watch.next(timeout=1.0)
        assert watch.held == before
        assert await controller.health() == 1  # still SERVING the last good registry

        # The node-scoped CA still follows the last good registry.
        doc = with_workload(example_doc(), "cart", "10.244.1.20")
        controller.write_registry(doc)
        delta = await watch.next()
        assert [r.key for r in delta.upserts] == ["shop/cart"]
    finally:
        await watch.close()


async def test_watch_needs_a_node_certificate(controller: RunningController) -> None:
    creds = await controller.join("node-a")
    # A node certificate is required on the main listener; the join listener has none.
    wrong = dataclasses.replace(creds, controller_address=controller.join_addr)
    watch = await Watcher.open(wrong)
    try:
        with pytest.raises(ApiError) as info:
            await watch.next()
        assert info.value.code == "UNAUTHENTICATED"
    finally:
        await watch.close()


async def test_sigterm_stops_cleanly(controller: RunningController) -> None:
    from .conftest import stop_process

    assert stop_process(controller.proc) == 0
