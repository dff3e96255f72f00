"""``veil ztunnel``: the ztunnel side of the ``veil`` CLI.

``veil ztunnel run --state-dir DIR --node NAME [...]`` runs the node's ztunnel
until SIGTERM/SIGINT, then drains. ``veil ztunnel health [--ready]`` asks
one instance over its ``--health-socket`` (the DaemonSet's exec probes; see
:mod:`ztunnel.admin.health_socket`). ``--workers N`` (``VEIL_ZTUNNEL_WORKERS``;
default one per usable CPU, at most 8) runs N worker processes sharing the
listeners under one supervisor; 1 runs today's single process. Every setting of
:class:`~ztunnel.config.ZtunnelConfig` is a flag here and a ``VEIL_*``
environment variable (flags win). The handler returns an exit code and raises
:class:`~veil.errors.VeilError` subclasses (printed with their hint
by the dispatcher in :mod:`cli.veil`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ztunnel.config import add_config_arguments, config_fields, config_from_args

__all__ = ["access_log_off_the_loop", "add_ztunnel_parser", "health_command", "run_command"]

if TYPE_CHECKING:
    from ztunnel.metrics.access_sink import AccessLogSink

    _Sub = argparse._SubParsersAction[argparse.ArgumentParser]

# The dispatcher's own --log-level applies; a second one here would shadow it.
_SKIPPED = frozenset({"log_level"})


def add_ztunnel_parser(sub: _Sub) -> None:
    """Adds ``veil ztunnel`` and its subcommands to the ``veil`` parser."""
    ztunnel = sub.add_parser(
        "ztunnel", help="run the node's zero-trust tunnel (listeners 15001/15006/15008)"
    )
    zsub = ztunnel.add_subparsers(dest="ztunnel_command", metavar="SUBCOMMAND", required=True)
    run = zsub.add_parser(
        "run",
        help="run the ztunnel until SIGTERM, then drain",
        description="Runs the ztunnel for one joined node. Settings come from flags, "
        "then VEIL_* environment variables, then defaults.",
    )
    run.add_argument(
        "--node",
        dest="node_name",
        default=None,
        metavar="NAME",
        help="this node's name (env VEIL_NODE_NAME; default: the name stored by "
        "`veil node join` in --state-dir, as the agent does)",
    )
    # The old second spelling keeps working for one release, with a warning.
    run.add_argument(
        "--node-name",
        dest="node_name",
        action=_DeprecatedAlias,
        metavar="NAME",
        help=argparse.SUPPRESS,
    )
    add_config_arguments(run, skip=_SKIPPED | {"node_name"})
    run.set_defaults(func=run_command)
    health = zsub.add_parser(
        "health",
        help="exit 0 when this pod's ztunnel is alive (or, with --ready, ready)",
        description="Asks the ztunnel on its --health-socket, a unix socket only that "
        "instance serves: unlike the shared :15021, the answer cannot come from another "
        "ztunnel on the node (a rolling-update surge). Exit 0 when healthy, 1 when not "
        "(the reason on stderr), 2 when no socket path is given.",
    )
    health.add_argument(
        "--health-socket",
        default=None,
        metavar="PATH",
        help="the ztunnel's health socket (env VEIL_ZTUNNEL_HEALTH_SOCKET)",
    )
    health.add_argument("--ready", action="store_true", help="check readiness, not liveness")
    health.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long to wait for the answer (default: 3)",
    )
    health.add_argument("-q", "--quiet", action="store_true", help="print nothing when healthy")
    health.set_defaults(func=health_command)


class _DeprecatedAlias(argparse.Action):
    """``--node-name``: stores like ``--node`` and says to use that instead."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(
            f"warning: {option_string} is deprecated and will be removed; use --node "
            "(or leave it out: the node name is read from the joined state)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def node_from_state(state_dir: str | os.PathLike[str] | None) -> str | None:
    """The node name `veil node join` stored, or None when there is no joined state."""
    from node.credentials import load_node_credentials
    from veil.errors import VeilError
    from ztunnel.config import DEFAULT_STATE_DIR

    directory = Path(state_dir) if state_dir else DEFAULT_STATE_DIR
    try:
        return load_node_credentials(directory).node
    except (VeilError, OSError):
        return None


def health_command(args: argparse.Namespace) -> int:
    """``veil ztunnel health``: one instance's answer, as a probe exit code."""
    from ztunnel.admin.health_socket import HealthUnavailable, query_health

    where = args.health_socket or os.environ.get("VEIL_ZTUNNEL_HEALTH_SOCKET")
    if not where:
        print(
            "error: no health socket given\nhint: pass --health-socket PATH or set "
            "VEIL_ZTUNNEL_HEALTH_SOCKET (the ztunnel must run with the same setting)",
            file=sys.stderr,
        )
        return 2
    check = "ready" if args.ready else "live"
    try:
        answer = query_health(Path(where), check, timeout=args.timeout)
    except HealthUnavailable as e:
        print(f"ztunnel not {check}: {e.message}\nhint: {e.hint}", file=sys.stderr)
        return 1
    if not answer.ok:
        print(f"ztunnel {answer.describe()}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"ztunnel {answer.describe()}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    """``veil ztunnel run``."""
    values = {k: v for k, v in vars(args).items() if k in config_fields()}
    if values.get("node_name") is None and "VEIL_NODE_NAME" not in os.environ:
        values["node_name"] = node_from_state(
            values.get("state_dir") or os.environ.get("VEIL_STATE_DIR")
        )
    if values.get("log_level") is None:
        values["log_level"] = getattr(args, "log_level", None) or os.environ.get(
            "VEIL_LOG_LEVEL", "info"
        )
    config = config_from_args(values)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=getattr(logging, config.log_level.upper()),
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
            stream=sys.stderr,
        )
    # Imported here so `veil --help` does not load the data path.
    from ztunnel.app import run_ztunnel
    from ztunnel.workers.supervision import resolve_workers
    from ztunnel.workers.supervisor import run_supervised

    count = resolve_workers(config.workers, len(os.sched_getaffinity(0)), os.uname().release)
    if count.warning:
        logging.getLogger("veil.ztunnel").warning("%s", count.warning)

    def main() -> Coroutine[Any, Any, int]:
        # One worker is today's single process, exactly: no supervisor.
        if count.workers == 1:
            return run_ztunnel(config)
        return run_supervised(config, count.workers)

    listener = access_log_off_the_loop()
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(main())
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    finally:
        listener.stop()  # flushes every queued access log line


def access_log_off_the_loop() -> AccessLogSink:
    """Writes access log lines from a thread, not the event loop
    (:mod:`ztunnel.metrics.access_sink`). Each line is the JSON object alone,
    without the timestamp/level prefix of the other logs, so a log shipper
    parses it as is. ``stop()`` writes every queued line."""
    from ztunnel.metrics.access_sink import AccessLogSink

    sink = AccessLogSink(sys.stderr)
    access = logging.getLogger("veil.access")
    access.addHandler(sink)
    access.propagate = False
    sink.start()
    return sink
