"""``veil``: runs Veil's components.

Each room contributes its subcommands through an ``add_parser(subparsers)``
function; this module only dispatches and turns :class:`VeilError` into a
readable message and exit code. Exit codes: 0 success, 1 a Veil error (the
message says what to do), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from veil.errors import VeilError

__all__ = ["main", "run_command"]

# (command, module, function): each room's parser, imported here so a room that
# is not installed or cannot import is reported by name instead of vanishing.
_ROOMS: tuple[tuple[str, str, str], ...] = (
    ("controller", "controller.cli", "add_controller_parser"),
    ("node", "controller.cli", "add_node_parser"),
    ("agent", "agent.cli.agent_cmd", "add_agent_parser"),
    ("ztunnel", "ztunnel.cli", "add_ztunnel_parser"),
    ("demo", "lab.demo", "add_demo_parser"),
)


def _unavailable(command: str, module: str, error: BaseException) -> Callable[[argparse.Namespace], int]:
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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil", description="Veil: a sidecarless service mesh (controller, node agent, ztunnel)."
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("VEIL_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env VEIL_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, module, func in _ROOMS:
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
    return parser


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
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return 2
    return run_command(handler, args)


if __name__ == "__main__":
    sys.exit(main())
