"""The agent's startup up to a ready data plane: credentials, pins, node setup.

These are steps 1 to 4 of :mod:`agent.daemon.agent`'s startup, in that order:

1. the node credentials ``veil node join`` left in the state dir;
2. preflight and program loading in a child process (:mod:`agent.daemon.loader`),
   so the long-lived agent never maps the compiler;
3. :meth:`Dataplane.open <agent.bpf.Dataplane.open>` on the pins the child left
   (same build: nothing is compiled, no filter changes, so pods a previous
   agent enrolled stay steered throughout);
4. ``setup_node``: policy routing and the uplink program.

Every failure is an :class:`~agent.errors.AgentError` naming the fix. What
:func:`open_dataplane` opened is closed again if a later step fails, and
otherwise handed over in a :class:`ReadyDataplane` the agent closes on exit.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.bpf import Dataplane, DataplaneOptions
from node import NodeCredentials, load_node_credentials

from .config import AgentConfig
from .errors import AgentStartupError
from .loader import LoadResult
from .netinfo import NodeNetwork

__all__ = ["ReadyDataplane", "another_agent_answers", "node_credentials", "open_dataplane"]

log = logging.getLogger("veil.agent")


def another_agent_answers(path: Path) -> bool:
    """True when an agent already serves the status socket at ``path``."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def node_credentials(config: AgentConfig) -> NodeCredentials:
    """This node's credentials; they must belong to ``--node`` when it is given."""
    creds = load_node_credentials(config.state_dir)
    if config.node and config.node != creds.node:
        raise AgentStartupError(
            f"the credentials in {config.state_dir} belong to node {creds.node!r}, "
            f"not {config.node!r}",
            hint="pass the matching --state-dir, or join this node again with "
            "`veil node join --node <name>`",
        )
    return creds


@dataclass(frozen=True, slots=True)
class ReadyDataplane:
    """The open data plane and what starting it found out."""

    load: LoadResult
    plane: Dataplane
    net: NodeNetwork
    uplink: str
    programs: dict[str, int]  # program name -> kernel program id

    async def close(self) -> None:
        """Close the handles; every program, filter and pin stays (fail closed)."""
        try:
            # pyroute2's synchronous API runs its own event loop: never on this one.
            await asyncio.to_thread(self.net.close)
        finally:
            await asyncio.to_thread(self.plane.close)


async def open_dataplane(
    config: AgentConfig,
    creds: NodeCredentials,
    loader: Callable[[Path, DataplaneOptions], LoadResult],
) -> ReadyDataplane:
    """Steps 2 to 4: load (or reuse) the programs, open the pins, set the node up."""
    options = config.dataplane_options()
    log.info("node %s: preflight and BPF programs (pins in %s)", creds.node, config.pin_dir)
    load = await asyncio.to_thread(loader, config.pin_dir, options)
    plane = await asyncio.to_thread(Dataplane.open, config.pin_dir, options)
    net: NodeNetwork | None = None
    try:
        if plane.build_id != load.build_id:
            log.warning("pins changed between loading and opening; the agent compiled itself")
        net = await asyncio.to_thread(NodeNetwork)
        if config.uplink is not None:
            uplink = config.uplink
        else:
            uplink = await asyncio.to_thread(net.detect_uplink, creds.controller_address)
        await asyncio.to_thread(plane.setup_node, uplink, probe_source=config.probe_source)
        node_state = await asyncio.to_thread(plane.node)
    except BaseException:
        if net is not None:
            await asyncio.to_thread(net.close)
        await asyncio.to_thread(plane.close)
        raise
    programs = {p.name: p.prog_id for p in node_state.programs}
    log.info(
        "data plane ready: build %s (%s), uplink %s, programs %s",
        plane.build_id[:12],
        "pins reused" if load.reused else f"loaded in {load.seconds:.1f}s",
        uplink,
        programs,
    )
    return ReadyDataplane(load, plane, net, uplink, programs)
