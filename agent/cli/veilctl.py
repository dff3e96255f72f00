"""``veilctl``: the node CLI for SREs. Reads the agent's status socket and the ztunnel admin API.

Every subcommand prints a readable table by default and the data itself with
``-o json`` or ``-o yaml``; under those, errors are a JSON/YAML object on
stdout too. Every list takes ``-n/--namespace`` and ``--workload``. Exit
codes: 0 all good, 1 findings or an error, 2 usage, 3 a component could not
be reached (the message says which and what to do).

The pure views live in :mod:`.rows`, :mod:`.filters` and :mod:`.whatif`; the
core tables in :mod:`.tables`, the newer verbs in :mod:`.commands`. This
module holds the parser and the error conventions.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from agent.cli.commands import (
    cmd_certs,
    cmd_config,
    cmd_log,
    cmd_monitor,
    cmd_policy_check,
    cmd_services,
    versions,
)
from agent.cli.controller_version import DEFAULT_NODE_STATE_DIR
from agent.cli.output import (
    EXIT_FINDINGS,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    FORMATS,
    render_error,
    render_kv,
)
from agent.cli.rows import (
    POD_COLUMNS,
    cert_rows,
    connection_rows,
    pod_rows,
    policy_rows,
    status_lines,
    verify_lines,
    workload_rows,
    ztunnel_summary,
)
from agent.cli.sources import Sources, Unreachable
from agent.cli.tables import (
    cmd_bpf_maps,
    cmd_bpf_source,
    cmd_connections,
    cmd_pods,
    cmd_policies,
    cmd_status,
    cmd_verify,
    cmd_workloads,
)
from veil.errors import VeilError

__all__ = [
    "EXIT_FINDINGS",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "POD_COLUMNS",
    "Unreachable",
    "cert_rows",
    "connection_rows",
    "main",
    "pod_rows",
    "policy_rows",
    "status_lines",
    "verify_lines",
    "workload_rows",
    "ztunnel_summary",
]

DEFAULT_AGENT_SOCKET = "/run/veil/agent.sock"
DEFAULT_ZTUNNEL_ADMIN = "127.0.0.1:15000"


# -- parser ---------------------------------------------------------------------------

_Handler = Callable[[Sources, argparse.Namespace, TextIO], int]


def _wanted_format(argv: Sequence[str]) -> str:
    """The -o value, read before parsing so usage errors can honour it."""
    for i, arg in enumerate(argv):
        for flag in ("-o", "--output"):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "=") or (
                flag == "-o" and arg.startswith("-o") and len(arg) > 2
            ):
                return arg.split("=", 1)[1] if "=" in arg else arg[2:]
    return "table"


class _Parser(argparse.ArgumentParser):
    """Exits 2 on usage errors, as a JSON/YAML object under -o json|yaml."""

    structured: str = "table"

    def error(self, message: str) -> NoReturn:
        if _Parser.structured in ("json", "yaml"):
            render_error(
                _Parser.structured,
                f"usage: {message}",
                hint=f"see {self.prog} --help",
                exit_code=EXIT_USAGE,
            )
            raise SystemExit(EXIT_USAGE)
        super().error(message)


_FMT = argparse.ArgumentDefaultsHelpFormatter


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="veilctl",
        formatter_class=_FMT,
        description="Inspect Veil on this node: pods, BPF state, workloads, services, policies, "
        "certificates, connections, drops and denies. Exit codes: 0 ok, 1 findings/error, "
        "2 usage, 3 component unreachable.",
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="print veilctl's version and the agent's, ztunnel's and controller's where reachable",
    )
    parser.add_argument(
        "--controller-health",
        metavar="HOST:PORT",
        default=os.environ.get("VEIL_CONTROLLER_HEALTH"),
        help="the controller's health endpoint, for --version (env VEIL_CONTROLLER_HEALTH; "
        "default: the joined controller's host, port 15014)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="PATH",
        type=Path,
        default=Path(os.environ.get("VEIL_STATE_DIR", str(DEFAULT_NODE_STATE_DIR))),
        help="this node's state directory from `veil node join` (env VEIL_STATE_DIR)",
    )
    parser.add_argument(
        "--agent-socket",
        metavar="PATH",
        default=os.environ.get("VEIL_AGENT_SOCKET", DEFAULT_AGENT_SOCKET),
        help="the agent's status socket (env VEIL_AGENT_SOCKET)",
    )
    parser.add_argument(
        "--ztunnel-admin",
        metavar="HOST:PORT",
        default=os.environ.get("VEIL_ZTUNNEL_ADMIN", DEFAULT_ZTUNNEL_ADMIN),
        help="the ztunnel admin API (env VEIL_ZTUNNEL_ADMIN)",
    )
    output = _Parser(add_help=False)
    output.add_argument("-o", "--output", choices=FORMATS, default="table", help="output format")
    certs_output = _Parser(add_help=False)
    certs_output.add_argument(
        "-o",
        "--output",
        choices=(*FORMATS, "pem"),
        default="table",
        help="output format (pem: the certificates themselves)",
    )
    filters = _Parser(add_help=False)
    filters.add_argument(
        "-n", "--namespace", metavar="NAMESPACE", default=None, help="only rows of this namespace"
    )
    filters.add_argument(
        "--workload", metavar="[NAMESPACE/]NAME", default=None, help="only rows of this workload"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(
        name: str,
        handler: _Handler,
        help: str,
        into: Any = sub,
        *,
        lists: bool = False,
        parents: Sequence[argparse.ArgumentParser] | None = None,
    ) -> argparse.ArgumentParser:
        parts = list(parents) if parents is not None else [output]
        if lists:
            parts.append(filters)
        p: argparse.ArgumentParser = into.add_parser(
            name, help=help, description=help, parents=parts, formatter_class=_FMT
        )
        p.set_defaults(handler=handler)
        return p

    add("status", cmd_status, "agent and ztunnel health, programs attached, versions")
    add("pods", cmd_pods, "local pods: address, veth, enrollment, programs, counters", lists=True)
    bpf = sub.add_parser("bpf", help="BPF state: pinned maps and the compiled source")
    bsub = bpf.add_subparsers(dest="bpf_command", metavar="COMMAND", required=True)
    from agent.bpf.pins import DEFAULT_PIN_DIR

    for name, handler, text in (
        ("maps", cmd_bpf_maps, "dump the pinned maps"),
        ("source", cmd_bpf_source, "the exact source compiled, with its -D flags"),
    ):
        p = add(name, handler, text, bsub)
        p.add_argument(
            "--pin-dir",
            metavar="PATH",
            default=os.environ.get("VEIL_PIN_DIR", str(DEFAULT_PIN_DIR)),
            help="read the pins here when the agent is down (env VEIL_PIN_DIR)",
        )
    w = add(
        "workloads", cmd_workloads, "local workloads (ztunnel view, else the agent's)", lists=True
    )
    w.add_argument("--all", action="store_true", help="every workload in the mesh, not only local")
    add("services", cmd_services, "services: VIPs, ports and their endpoints", lists=True)
    pol = sub.add_parser("policy", help="policy what-if: which policy decides a connection")
    psub = pol.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    chk = add(
        "check",
        cmd_policy_check,
        "what-if: would --from reach --to, which policy decides and why (exit 1: deny)",
        psub,
    )
    chk.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="WORKLOAD|IDENTITY|IP",
        help="the caller: [NAMESPACE/]NAME, spiffe://TD/ns/NS/sa/SA, or an IP",
    )
    chk.add_argument(
        "--to",
        required=True,
        metavar="WORKLOAD:PORT",
        help="the destination: [NAMESPACE/]NAME:PORT or IP:PORT",
    )
    add("policies", cmd_policies, "authorization policies and peer authentication", lists=True)
    c = add(
        "certs",
        cmd_certs,
        "workload certificates: identity, serial, expiry, rotation",
        lists=True,
        parents=[certs_output],
    )
    c.add_argument(
        "--chain",
        action="store_true",
        help="each certificate's full chain (subject, issuer, validity) and the roots",
    )
    add("connections", cmd_connections, "live connections through the ztunnel", lists=True)
    add("config", cmd_config, "the full dump: ztunnel config_dump and agent status (YAML)")
    lg = add("log", cmd_log, "show or change log levels at runtime")
    lg.add_argument(
        "--level",
        metavar="[COMPONENT=]LEVEL[,...]",
        default=None,
        help="e.g. debug, proxy=debug, access=off (default: show the levels)",
    )
    lg.add_argument(
        "--component",
        choices=("all", "agent", "ztunnel"),
        default="all",
        help="which process to ask",
    )
    m = add("monitor", cmd_monitor, "live stream of BPF drops and policy denies", lists=True)
    m.add_argument(
        "--type",
        choices=("all", "drop", "deny"),
        default="all",
        help="drop: BPF drops (agent); deny: ztunnel policy denies",
    )
    m.add_argument(
        "--pod",
        dest="workload",
        metavar="[NAMESPACE/]NAME",
        default=None,
        help="only this pod's drops and denies (same as --workload)",
    )
    m.add_argument(
        "--reason",
        metavar="REASON",
        default=None,
        help="only drops with this reason, e.g. spoofed_source, no_listener",
    )
    m.add_argument(
        "--count",
        type=int,
        default=0,
        metavar="N",
        help="stop after N events (0: until interrupted)",
    )
    m.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long without an event (default: never)",
    )
    add("verify", cmd_verify, "audit: exits 1 when any enrolled pod could bypass the mesh")
    from agent.cli.waypoint_cmd import DEFAULT_WAYPOINT_ADMIN, cmd_waypoint

    wpc = add(
        "waypoint",
        cmd_waypoint,
        "a waypoint's destinations, attached policies and open tunnels (its admin API)",
    )
    wpc.add_argument(
        "--admin",
        metavar="HOST:PORT",
        default=os.environ.get("VEIL_WAYPOINT_ADMIN", DEFAULT_WAYPOINT_ADMIN),
        help="the waypoint's admin API (env VEIL_WAYPOINT_ADMIN)",
    )
    return parser


def _version(src: Sources, args: argparse.Namespace, fmt: str, out: TextIO) -> int:
    data = versions(src, args.controller_health, args.state_dir)
    if fmt != "table":
        render_kv(data, fmt, out)
        return EXIT_OK
    out.write(f"veilctl {data['client']}\n")
    why = data.get("unreachable") or {}
    for component in ("agent", "ztunnel", "controller"):
        found = data.get(component)
        note = f" ({why[component]})" if component == "controller" and component in why else ""
        out.write(f"{component}: {found or 'unreachable'}{note}\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fmt = _wanted_format(argv)
    _Parser.structured = fmt
    parser = _build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    stream = out or sys.stdout
    fmt = getattr(args, "output", fmt)
    try:
        src = Sources(args.agent_socket, args.ztunnel_admin)
        if args.version:
            return _version(src, args, fmt, stream)
        handler: _Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_usage(sys.stderr)
            render_error(
                fmt, "no command given", hint="see veilctl --help", exit_code=EXIT_USAGE, out=stream
            )
            return EXIT_USAGE
        return handler(src, args, stream)
    except Unreachable as exc:
        render_error(
            fmt,
            exc.message,
            hint=exc.hint,
            exit_code=EXIT_UNREACHABLE,
            component=exc.component,
            out=stream,
        )
        return EXIT_UNREACHABLE
    except VeilError as exc:
        render_error(fmt, exc.message, hint=exc.hint, exit_code=EXIT_FINDINGS, out=stream)
        return EXIT_FINDINGS
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
