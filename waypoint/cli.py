"""``veil waypoint``: the waypoint side of the ``veil`` CLI.

``veil waypoint run --node NAME --namespace NS --name NAME [...]`` runs the
waypoint until SIGTERM/SIGINT, then drains. Every setting of
:class:`~waypoint.config.WaypointConfig` is a flag and a ``VEIL_*`` variable.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from .config import add_config_arguments, config_from_args

__all__ = ["add_waypoint_parser", "run_command"]

if TYPE_CHECKING:
    _Sub = argparse._SubParsersAction[argparse.ArgumentParser]


def add_waypoint_parser(sub: _Sub) -> None:
    """Adds ``veil waypoint`` and its subcommands to the ``veil`` parser."""
    waypoint = sub.add_parser("waypoint", help="run an L7 waypoint (HTTP authorization, JWT)")
    wsub = waypoint.add_subparsers(dest="waypoint_command", metavar="SUBCOMMAND", required=True)
    run = wsub.add_parser(
        "run",
        help="run the waypoint until SIGTERM, then drain",
        description="Runs a waypoint. Its node must have joined the controller "
        "(`veil node join`), and the registry must hold its Workload on that node with "
        "the label veil.io/waypoint=<name>. Settings come from flags, then VEIL_* "
        "environment variables, then defaults.",
    )
    add_config_arguments(run)
    run.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """``veil waypoint run``."""
    config = config_from_args(args)
    # Imported here so `veil --help` does not load the data path.
    from .app import run_waypoint

    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_waypoint(config))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_waypoint(config))
