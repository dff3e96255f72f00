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

from controller.api.errors import VeilError

__all__ = ["main", "run_command"]

# (module, function) pairs, imported lazily so `veil controller` never loads bcc.
_ROOMS: tuple[tuple[str, str], ...] = (
    ("controller.cli", "add_controller_parser"),
    ("controller.cli", "add_node_parser"),
    ("agent.cli.agent_cmd", "add_agent_parser"),
    ("ztunnel.cli", "add_ztunnel_parser"),
    ("agent.demo", "add_demo_parser"),
)


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
    for module, func in _ROOMS:
        try:
            add: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] = getattr(
                importlib.import_module(module), func
            )
        except (ImportError, AttributeError):
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
