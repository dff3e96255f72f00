"""How a node process opens its link to the controller.

The ztunnel (one worker or a supervisor of several) and the waypoint start the
same way: load the credentials ``veil node join`` stored, check that they are
this node's, open the :class:`~node.channel.ControllerChannel`, and run a
:class:`~node.watch.WatchClient` from it into a state store. This module owns
those steps so the processes differ only in what they build on top.
"""

from __future__ import annotations

from pathlib import Path

from .backoff import Backoff
from .channel import ControllerChannel
from .credentials import NodeCredentials, load_node_credentials
from .errors import NodeCredentialsError
from .state import StateStore
from .watch import WatchClient

__all__ = ["connect_node", "watch_controller"]


def connect_node(
    state_dir: Path,
    node_name: str,
    *,
    address: str | None = None,
    credentials: NodeCredentials | None = None,
    hint: str = "pass the node name used at `veil node join`, or that node's state directory",
) -> ControllerChannel:
    """Open the controller channel of ``node_name`` with its stored credentials.

    ``credentials`` (already loaded) skip the read of ``state_dir``; ``address``
    overrides the controller address stored at join. Credentials of another
    node are refused: running as the wrong node would serve its workloads.
    """
    creds = credentials if credentials is not None else load_node_credentials(state_dir)
    if creds.node != node_name:
        raise NodeCredentialsError(
            f"the credentials in {state_dir} belong to node {creds.node!r}, not {node_name!r}",
            hint=hint,
        )
    return ControllerChannel(state_dir, creds, address=address or None)


def watch_controller(
    channel: ControllerChannel, store: StateStore, backoff: Backoff
) -> WatchClient:
    """The Discovery watch of ``channel`` into ``store``."""
    # Sleeping on the channel retries the moment the controller is reachable
    # again, not when the backoff timer the outage set fires.
    return WatchClient(channel, store, backoff=backoff, sleep=channel.sleep)
