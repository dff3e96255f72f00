"""The agent's node identity: renews the node certificate, keeps the controller channel.

The node certificate ``veil node join`` stored expires (24 h by default). The
agent, the node's long-running owner of the state directory, renews it at
half-life (a new key, over the current mTLS channel) and writes it back, where
the ztunnel picks it up. Whoever renewed, a changed certificate or trust
bundle on disk makes the agent reopen its channel; the watch reconnects on
the new one and resumes where it was.

A read-only state directory (the DaemonSet mounts it so when the init
container owns joining) only disables renewal: the agent then follows what
others write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.api.model import ResourceType, WatchUpdate
from node import NodeCredentials, renew_node_certificate
from node.channel import ControllerChannel
from veil.errors import VeilError

__all__ = ["NodeIdentity", "renewal_due"]

log = logging.getLogger("veil.agent.identity")

_CHECK_INTERVAL = 30.0


def renewal_due(
    not_before: datetime, not_after: datetime, now: datetime, fraction: float = 0.5
) -> datetime | None:
    """When the certificate should be renewed, or None if that time has not come yet."""
    due = not_before + (not_after - not_before) * fraction
    return due if now >= due else None


class NodeIdentity:
    """Renews the node certificate and owns the agent's controller channel.

    The channel (:class:`node.channel.ControllerChannel`, shared with the
    ztunnel) reopens itself when the credentials on disk change; ``watch``
    always uses the current one.
    """

    def __init__(
        self,
        state_dir: Path,
        creds: NodeCredentials,
        *,
        types: Iterable[ResourceType] = (),
        check_interval: float = _CHECK_INTERVAL,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.state_dir = state_dir
        self.channel = ControllerChannel(state_dir, creds, types=types)
        self._interval = check_interval
        self._now = now
        self.last_error: str | None = None
        self.renewals = 0

    @property
    def creds(self) -> NodeCredentials:
        return self.channel.creds

    # -- the watch source (node.watch.WatchSource) ---------------------------------

    def watch(
        self,
        node: str = "",
        types: Iterable[ResourceType] = (),
        epoch: str = "",
        version: int = 0,
    ) -> AsyncIterator[WatchUpdate]:
        """The current channel's watch, limited to the resource types the agent needs."""
        return self.channel.watch(node, types, epoch, version)

    # -- upkeep ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew when due and follow the state directory; returns only by cancellation."""
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def check(self) -> None:
        leaf = self.creds.leaf
        if renewal_due(leaf.not_valid_before_utc, leaf.not_valid_after_utc, self._now()):
            try:
                renewed = await renew_node_certificate(self.state_dir)
            except (VeilError, OSError) as exc:
                self.last_error = f"renewing the node certificate failed: {exc}"
                log.warning("%s; retrying in %.0fs", self.last_error, self._interval)
            else:
                self.renewals += 1
                self.last_error = None
                log.info("node certificate renewed; valid until %s", renewed.not_after.isoformat())
        await self.reload()

    async def reload(self) -> None:
        """Reopen the channel when the credentials on disk differ from the ones in use."""
        await self.channel.reload()

    async def close(self) -> None:
        await self.channel.close()

    def status(self) -> dict[str, Any]:
        leaf = self.creds.leaf
        due = leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
        return {
            "identity": str(self.creds.identity),
            "controller": self.creds.controller_address,
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "renew_at": due.isoformat(),
            "renewals": self.renewals,
            "last_error": self.last_error,
            "checked_at": time.time(),
        }
