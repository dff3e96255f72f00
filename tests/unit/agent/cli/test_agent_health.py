"""``veil agent health``: what counts as alive and as ready in the agent's /status answer."""

from __future__ import annotations

from typing import Any

import pytest

from agent.cli.agent_cmd import agent_health

SYNCED: dict[str, Any] = {"registry": {"synced": True}, "reconciles": 3}
STARTING: dict[str, Any] = {"registry": {"synced": False}, "reconciles": 0}


@pytest.mark.parametrize(
    ("status", "ready", "healthy"),
    [
        (SYNCED, False, True),
        (SYNCED, True, True),
        # Waiting for the controller: alive (never restart it for that), not ready.
        (STARTING, False, True),
        (STARTING, True, False),
        ({"registry": {"synced": False}, "reconciles": 1}, True, True),
        (["not", "an", "object"], False, False),
        (None, True, False),
    ],
)
def test_agent_health(status: Any, ready: bool, healthy: bool) -> None:
    assert (agent_health(status, ready=ready) is None) == healthy


@pytest.mark.parametrize(
    ("answering", "ready", "healthy"),
    [
        ("veil-node-new", True, True),
        ("veil-node-new", False, True),
        # The old pod's agent still holds the shared socket path during a surge.
        ("veil-node-old", True, False),
        ("veil-node-old", False, False),
        # An agent too old to report its pod is not this pod's either.
        (None, True, False),
    ],
)
def test_agent_health_of_this_pod(answering: str | None, ready: bool, healthy: bool) -> None:
    status = {**SYNCED, "pod": answering}
    problem = agent_health(status, ready=ready, pod="veil-node-new")
    assert (problem is None) == healthy
    if not healthy:
        assert problem is not None and "has not taken the status socket over" in problem
