"""``veil``: runs Veil's components.

Each room contributes its subcommands through an ``add_parser(subparsers)``
function; this module only dispatches and turns :class:`VeilError` into a
readable message and exit code. Exit codes: 0 success, 1 a Veil error (the
message says what to do), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# gRPC's C core logs on its own (absl) to stderr, bypassing Python logging:
# "E0000 ... ev_poll_posix" lines in the middle of CLI output. Silence it
# before any room imports grpc, unless the user asked for it explicitly.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
os.environ.setdefault("GRPC_TRACE", "")
# Veil never forks a process that keeps using gRPC: children (ztunnel workers,
# helpers) exec a fresh interpreter. gRPC's fork handlers only add risk then: a
# child forked while the controller channel's threads are busy can abort in them
# before it reaches exec. Off, unless the user asked for them explicitly.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from veil.errors import VeilError
from veil.settings import finish_help

__all__ = ["main", "run_command"]

# (command, module, function): each room's parser, imported here so a room that
# is not installed or cannot import is reported by name instead of vanishing.
_ROOMS: tuple[tuple[str, str, str], ...] = (
    ("controller", "controller.cli", "add_controller_parser"),
    ("node", "controller.cli", "add_node_parser"),
    ("agent", "agent.cli.agent_cmd", "add_agent_parser"),
    ("ztunnel", "ztunnel.cli", "add_ztunnel_parser"),
    ("waypoint", "waypoint.cli", "add_waypoint_parser"),
    ("demo", "lab.demo", "add_demo_parser"),
)


def _unavailable(
    command: str, module: str, error: BaseException
) -> Callable[[argparse.Namespace], int]:
    """A handler that explains why ``veil COMMAND`` cannot run in this installation."""

    def handler(_args: argparse.Namespace) -> int:
        print(
            f"error: `veil {command}` is unavailable: importing {module} failed: "
            f"{type(error).__name__}: {error}",
            file=sys.stderr,
        )
        print(
            "  hint: reinstall Veil with its dependencies (make setup), or run "
            f"`python -c 'import {module}'` to see the full traceback",
            file=sys.stderr,
        )
        return 1

    return handler


def _rooms_for(argv: Sequence[str]) -> tuple[tuple[str, str, str], ...]:
    """The rooms to import for ``argv``: only the named command's, when it names
    one. A long-running process carries every module it imported: a ztunnel that
    imported the other rooms' parsers (and with them the agent's netlink library,
    the controller, the lab) held about 20 MB more for nothing."""
    commands = {command for command, _module, _func in _ROOMS}
    for word in argv:
        if word in ("-h", "--help"):
            break
        if word in commands:
            return tuple(room for room in _ROOMS if room[0] == word)
    return _ROOMS


def _build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil",
        description="Veil: a sidecarless service mesh (controller, node agent, ztunnel).",
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="print Veil's version, and this node's agent and ztunnel versions and the "
        "controller's where reachable",
    )
    parser.add_argument(
        "--controller-health",
        metavar="HOST:PORT",
        default=os.environ.get("VEIL_CONTROLLER_HEALTH"),
        help="where --version asks the controller (env VEIL_CONTROLLER_HEALTH; default: the "
        "joined controller's host, port 15014)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("VEIL_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env VEIL_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, module, func in _rooms_for(sys.argv[1:] if argv is None else argv):
        try:
            add: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] = getattr(
                importlib.import_module(module), func
            )
        except (ImportError, AttributeError) as e:
            broken = sub.add_parser(
                command, help=f"(unavailable: {module} failed to import)", add_help=False
            )
            broken.add_argument("rest", nargs=argparse.REMAINDER)
            broken.set_defaults(func=_unavailable(command, module, e))
            continue
        add(sub)
    finish_help(parser)
    return parser


def _print_version(controller_health: str | None = None) -> int:
    try:
        version = importlib.metadata.version("veil-mesh")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    print(f"veil {version}")
    try:
        from agent.cli.commands import versions
        from agent.cli.controller_version import DEFAULT_NODE_STATE_DIR
        from agent.cli.sources import Sources

        found = versions(
            Sources(
                os.environ.get("VEIL_AGENT_SOCKET", "/run/veil/agent.sock"),
                os.environ.get("VEIL_ZTUNNEL_ADMIN", "127.0.0.1:15000"),
            ),
            controller_health,
            Path(os.environ.get("VEIL_STATE_DIR", str(DEFAULT_NODE_STATE_DIR))),
        )
    except (ImportError, VeilError):
        return 0
    for component in ("agent", "ztunnel", "controller"):
        print(f"{component}: {found.get(component) or 'not reachable from here'}")
    return 0


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs a subcommand handler with Veil's error and interrupt conventions."""
    try:
        return handler(args)
    except VeilError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        return _print_version(args.controller_health)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        print("veil: error: a command is required (see veil --help)", file=sys.stderr)
        return 2
    return run_command(handler, args)


if __name__ == "__main__":
    sys.exit(main())
