"""``veil agent run | uninstall | preflight | health``: the node agent's commands.

Handlers return the exit code and raise :class:`VeilError` (with a hint) for
anything the user must fix; ``veil`` prints those without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bpf.pins import DEFAULT_PIN_DIR
from agent.cli.output import Column, render, render_kv
from agent.daemon.config import DEFAULT_STATUS_SOCKET, add_config_arguments, config_from_args
from agent.daemon.errors import AgentConfigError

__all__ = ["add_agent_parser", "agent_health"]

if TYPE_CHECKING:
    _Sub = argparse._SubParsersAction[argparse.ArgumentParser]


def _pin_dir(args: argparse.Namespace) -> Path:
    return Path(args.pin_dir or os.environ.get("VEIL_PIN_DIR") or DEFAULT_PIN_DIR)


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon.agent import run_agent

    return run_agent(config_from_args(args))


def _cmd_preflight(args: argparse.Namespace) -> int:
    from agent.preflight import run_preflight

    report = run_preflight(_pin_dir(args), allow_mount=not args.no_mount)
    rows = [
        {
            "check": c.name,
            "result": "skip"
            if c.skipped
            else (("WARN" if c.warning else "ok") if c.ok else "FAIL"),
            "detail": c.detail,
            "fix": c.fix,
        }
        for c in report.checks
    ]
    if args.output == "json":
        render_kv(report.to_dict(), "json")
    else:
        render(
            rows,
            [Column("CHECK", "check"), Column("RESULT", "result"), Column("DETAIL", "detail")],
            "table",
        )
        for row in rows:
            if row["result"] != "ok" and row["fix"]:
                print(f"\nfix {row['check']}: {row['fix']}")
        for c in report.checks:
            if c.warning:
                print(f"\nwarning {c.name}: {c.warning}")
        print("\nnode ready for Veil" if report.ok else "\nnode NOT ready: fix the items above")
    return 0 if report.ok else 1


def _agent_running(socket_path: Path) -> bool:
    from agent.status import StatusClient, StatusUnavailable

    if not socket_path.exists():
        return False
    try:
        StatusClient(str(socket_path), timeout=2.0).get("/status")
    except StatusUnavailable:
        return False
    return True


def agent_health(status: Any, *, ready: bool, pod: str | None = None) -> str | None:
    """None when the agent's ``/status`` answer is healthy, else what is wrong.

    Alive: the status API answered at all (its event loop runs; the answer
    depends on nothing outside the process but the pinned maps). Ready: it has
    also applied the controller's state to the node at least once. ``pod``:
    the answer must also come from the agent of that pod. During a rolling
    update the socket path is shared by two pods' agents and leads to the old
    one until the new one takes it over, so without this check the old agent
    would make the new pod look started and ready.
    """
    if not isinstance(status, dict):
        return "the status API answered with something other than a JSON object"
    if pod is not None and status.get("pod") != pod:
        other = status.get("pod") or "unknown"
        return (
            f"the agent answering is pod {other}'s, not this pod's ({pod}): this pod's "
            "agent has not taken the status socket over yet"
        )
    if not ready:
        return None
    registry = status.get("registry") or {}
    if not (isinstance(registry, dict) and registry.get("synced")) and not status.get("reconciles"):
        return "no state from the controller applied yet"
    return None


def _cmd_health(args: argparse.Namespace) -> int:
    from agent.status import StatusClient, StatusUnavailable

    sock = Path(args.status_socket or os.environ.get("VEIL_AGENT_SOCKET") or DEFAULT_STATUS_SOCKET)
    try:
        status = StatusClient(str(sock), timeout=args.timeout).get("/status")
    except StatusUnavailable as e:
        print(f"agent not healthy: {e}", file=sys.stderr)
        return 1
    pod = None
    if args.this_pod:
        pod = os.environ.get("VEIL_POD_NAME")
        if not pod:
            print(
                "error: --this-pod needs VEIL_POD_NAME (the downward API's metadata.name)",
                file=sys.stderr,
            )
            return 2
    problem = agent_health(status, ready=args.ready, pod=pod)
    if problem is not None:
        print(f"agent not {'ready' if args.ready else 'alive'}: {problem}", file=sys.stderr)
        return 1
    if not args.quiet:
        print("ready" if args.ready else "alive")
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    from agent.daemon.uninstall import uninstall

    pin_dir = _pin_dir(args)
    sock = Path(args.status_socket or os.environ.get("VEIL_AGENT_SOCKET") or DEFAULT_STATUS_SOCKET)
    if not args.force and _agent_running(sock):
        raise AgentConfigError(
            f"the agent is still running (its status socket {sock} answers); it would put "
            "everything back on its next resync",
            hint="stop the agent first (systemctl stop / delete the veil-node pod), then run "
            "this again; --force removes everything anyway",
        )
    report = uninstall(pin_dir)
    if args.output == "json":
        render_kv(report.to_dict(), "json")
    else:
        if not report.removed:
            print(f"nothing of Veil found in this network namespace or under {pin_dir}")
        for item in report.removed:
            print(f"removed {item}")
        for item in report.remaining:
            print(f"NOT removed: {item}", file=sys.stderr)
    if report.remaining:
        raise AgentConfigError(
            f"{len(report.remaining)} item(s) could not be removed",
            hint="run it again as root in the node's network namespace; see the list above",
        )
    return 0


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="output format (default: table)",
    )


def add_agent_parser(sub: _Sub) -> None:
    """Adds ``veil agent ...`` to the top-level subparsers."""
    agent: Any = sub.add_parser(
        "agent", help="the node agent: eBPF steering of this node's pods into the ztunnel"
    )
    asub = agent.add_subparsers(dest="agent_command", metavar="COMMAND", required=True)

    run = asub.add_parser(
        "run",
        help="run the agent (preflight, load programs, keep pods enrolled, status API)",
        description="Runs until SIGTERM. Stopping leaves every program attached (fail closed); "
        "`veil agent uninstall` removes them. SIGHUP reconciles at once.",
    )
    add_config_arguments(run)
    run.set_defaults(func=_cmd_run)

    un = asub.add_parser(
        "uninstall",
        help="remove every Veil filter, pin, rule and route from this node",
    )
    un.add_argument(
        "--pin-dir",
        default=None,
        help=f"pin directory (default {DEFAULT_PIN_DIR}; env VEIL_PIN_DIR)",
    )
    un.add_argument(
        "--status-socket",
        default=None,
        help="the agent's status socket, to refuse while it runs "
        f"(default {DEFAULT_STATUS_SOCKET}; env VEIL_AGENT_SOCKET)",
    )
    un.add_argument("--force", action="store_true", help="remove even while the agent runs")
    _add_output(un)
    un.set_defaults(func=_cmd_uninstall)

    health = asub.add_parser(
        "health",
        help="exit 0 when the running agent answers on its status socket (probes)",
        description="Liveness by default: the agent's status API answers. With --ready, the "
        "agent has also applied the controller's state at least once. Exit 1 otherwise, "
        "with the reason on stderr.",
    )
    health.add_argument(
        "--status-socket",
        default=None,
        help=f"the agent's status socket (default {DEFAULT_STATUS_SOCKET}; env VEIL_AGENT_SOCKET)",
    )
    health.add_argument("--ready", action="store_true", help="check readiness instead of liveness")
    health.add_argument(
        "--this-pod",
        action="store_true",
        help="also require that the answering agent runs in this pod "
        "(env VEIL_POD_NAME), not in the other pod of a rolling update; for "
        "startup and readiness probes, never liveness",
    )
    health.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)"
    )
    health.add_argument("-q", "--quiet", action="store_true", help="print nothing when healthy")
    health.set_defaults(func=_cmd_health)

    pre = asub.add_parser(
        "preflight", help="check this node can run the data plane; prints the fix for each problem"
    )
    pre.add_argument(
        "--pin-dir",
        default=None,
        help=f"pin directory (default {DEFAULT_PIN_DIR}; env VEIL_PIN_DIR)",
    )
    pre.add_argument(
        "--no-mount",
        action="store_true",
        help="do not mount bpffs when it is missing; report it instead",
    )
    _add_output(pre)
    pre.set_defaults(func=_cmd_preflight)
