"""The core ``veilctl`` tables: status, pods, BPF maps and source, workloads,
policies, connections and the bypass audit.

Each handler takes the :class:`~agent.cli.sources.Sources`, the parsed
arguments and the output stream, prints a table (or the data under ``-o
json|yaml``) and returns the exit code. The parser and the error conventions
stay in :mod:`agent.cli.veilctl`; the newer verbs live in :mod:`.commands`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from agent.cli.commands import pin_dir_problem, row_filter
from agent.cli.output import (
    EXIT_FINDINGS,
    EXIT_OK,
    EXIT_UNREACHABLE,
    Column,
    render,
    render_kv,
)
from agent.cli.rows import (
    POD_COLUMNS,
    connection_rows,
    drops_text,
    pod_rows,
    policy_rows,
    status_lines,
    verify_lines,
    workload_rows,
    ztunnel_summary,
)
from agent.cli.sources import Sources, Unreachable
from veil.errors import VeilError

__all__ = [
    "cmd_bpf_maps",
    "cmd_bpf_source",
    "cmd_connections",
    "cmd_pods",
    "cmd_policies",
    "cmd_status",
    "cmd_verify",
    "cmd_workloads",
]


def cmd_status(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    agent = zt = None
    errors: dict[str, str] = {}
    unreachable: list[Unreachable] = []
    try:
        agent = src.agent("/status")
    except Unreachable as exc:
        errors["agent"], agent = exc.message, None
        unreachable.append(exc)
    try:
        zt = src.ztunnel()
    except Unreachable as exc:
        errors["ztunnel"] = exc.message
        unreachable.append(exc)
    if args.output != "table":
        render_kv(
            {"agent": agent, "ztunnel": ztunnel_summary(zt), "errors": errors}, args.output, out
        )
    else:
        render_kv(status_lines(agent, zt, errors), "table", out)
    for down in unreachable:
        print(f"\n{down.component} unreachable: {down.hint}", file=sys.stderr)
    return EXIT_UNREACHABLE if unreachable else EXIT_OK


def cmd_pods(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    pods = row_filter(args).pods(src.agent("/pods"))
    if args.output != "table":
        render(pods, (), args.output, out)
    else:
        render(pod_rows(pods), POD_COLUMNS, "table", out, empty="(no local pods)")
    return EXIT_OK


def _inspect_pins(args: argparse.Namespace) -> Any:
    from agent.bpf import DataplaneView

    return DataplaneView.inspect(args.pin_dir)


def cmd_bpf_maps(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    try:
        data = src.agent("/bpf/maps")
    except Unreachable as down:
        # The maps are pinned: readable straight from bpffs with the agent down.
        problem = pin_dir_problem(Path(args.pin_dir))
        if problem is not None:
            raise VeilError(
                f"the agent is unreachable ({down.message}) and there are no pins to read: "
                f"{problem}",
                hint=down.hint,
            ) from None
        try:
            with _inspect_pins(args) as view:
                data = {"pin_dir": str(view.pin_dir), **view.maps_dump().to_dict()}
        except VeilError as e:
            raise VeilError(
                f"the agent is unreachable ({down.message}) and the pins in {args.pin_dir} "
                f"cannot be read: {e.message}",
                hint=e.hint or down.hint,
            ) from None
        print(f"(agent unreachable: read the pins in {args.pin_dir} directly)", file=sys.stderr)
    if args.output != "table":
        render_kv(data, args.output, out)
        return EXIT_OK
    out.write(f"pin dir: {data.get('pin_dir')}\n\nconfig:\n")
    for k, v in sorted((data.get("config") or {}).items()):
        out.write(f"  {k}: {v if v not in (None, '') else '-'}\n")
    out.write("\npods (ifindex -> pod address):\n")
    render(
        data.get("pods", []),
        (
            Column("IFINDEX", "ifindex"),
            Column("IP", "ip"),
            Column("ENROLLED", "enrolled"),
            Column("FLAGS", "flags"),
        ),
        "table",
        out,
    )
    out.write("\npod_addrs (ifindex -> every source address the pod may use):\n")
    render(
        data.get("pod_addrs", []),
        (Column("IFINDEX", "ifindex"), Column("FAMILY", "family"), Column("IP", "ip")),
        "table",
        out,
    )
    out.write("\nlocal_ips, local_ips6 (enrolled address -> ifindex):\n")
    render(
        data.get("local_ips", []), (Column("IP", "ip"), Column("IFINDEX", "ifindex")), "table", out
    )
    out.write("\ncounters:\n")
    counters = [
        {
            "ifindex": k,
            "out": v.get("outbound_redirected"),
            "in": v.get("inbound_redirected"),
            "established": v.get("established"),
            "drops": drops_text(v.get("drops") or {}) or "-",
        }
        for k, v in sorted((data.get("counters") or {}).items(), key=lambda kv: int(kv[0]))
    ]
    render(
        counters,
        (
            Column("IFINDEX", "ifindex"),
            Column("REDIRECTED_OUT", "out"),
            Column("REDIRECTED_IN", "in"),
            Column("ESTABLISHED", "established"),
            Column("DROPS", "drops"),
        ),
        "table",
        out,
    )
    return EXIT_OK


def cmd_bpf_source(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    try:
        data = src.agent("/bpf/source")
    except Unreachable as down:
        try:
            with _inspect_pins(args) as view:
                unit = view.source()
        except VeilError:
            raise down from None
        if unit is None:
            raise VeilError(
                f"the agent is unreachable and the sources here do not match the build pinned in "
                f"{args.pin_dir}",
                hint="start the agent, or run veilctl from the same Veil release as the agent",
            ) from None
        data = {
            "build_id": unit.build_id,
            "cflags": list(unit.cflags),
            "files": [str(f.path) for f in unit.files],
            "source": unit.render(),
        }
    if args.output != "table":
        render_kv(data, args.output, out)
    else:
        out.write(str(data.get("source", "")))
        out.write("\n")
    return EXIT_OK


def cmd_workloads(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    try:
        rows = workload_rows(
            row_filter(args).workloads(src.ztunnel().get("workloads", [])), local_only=not args.all
        )
    except Unreachable:
        if args.all:
            raise
        rows = workload_rows(row_filter(args).workloads(src.agent("/workloads")), local_only=False)
        print("(ztunnel unreachable: local workloads as the agent sees them)", file=sys.stderr)
    render(
        rows,
        (
            Column("WORKLOAD", "workload"),
            Column("IDENTITY", "identity"),
            Column("IPS", "ips"),
            Column("NODE", "node"),
            Column("ENROLLED", "enrolled"),
            Column("READY", "ready"),
        ),
        args.output,
        out,
        empty="(no workloads)",
    )
    return EXIT_OK


def cmd_policies(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    dump = src.ztunnel()
    rf = row_filter(args)
    policies = rf.policies(dump.get("policies", []), dump.get("workloads", []))
    peer = [
        a
        for a in dump.get("peer_authentications", [])
        if rf.namespace is None or a.get("namespace") == rf.namespace
    ]
    if args.output != "table":
        render_kv(
            {"authorization_policies": policies, "peer_authentications": peer}, args.output, out
        )
        return EXIT_OK
    render(
        policy_rows(policies),
        (
            Column("POLICY", "policy"),
            Column("ACTION", "action"),
            Column("SELECTOR", "selector"),
            Column("L7", "l7"),
            Column("RULES", "rules"),
        ),
        "table",
        out,
        empty="(no authorization policies)",
    )
    out.write("\n")
    render(
        [
            {
                "key": a.get("key"),
                "mode": a.get("mode"),
                "selector": a.get("selector") if a.get("selector") is not None else "(namespace)",
            }
            for a in peer
        ],
        (
            Column("PEER AUTHENTICATION", "key"),
            Column("MODE", "mode"),
            Column("SELECTOR", "selector"),
        ),
        "table",
        out,
        empty="(no peer authentications)",
    )
    return EXIT_OK


def cmd_connections(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    conns = row_filter(args).connections(src.ztunnel().get("connections", []))
    if args.output != "table":
        render(conns, (), args.output, out)
    else:
        render(
            connection_rows(conns),
            (
                Column("DIR", "direction"),
                Column("SOURCE", "src"),
                Column("SOURCE IDENTITY", "src_identity"),
                Column("DESTINATION", "dst"),
                Column("DESTINATION IDENTITY", "dst_identity"),
                Column("BYTES(IN/OUT)", "bytes"),
                Column("AGE", "duration"),
                Column("VERDICT", "verdict"),
            ),
            "table",
            out,
            empty="(no live connections)",
        )
    return EXIT_OK


def cmd_verify(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    from agent.daemon.audit import check_listeners
    from agent.daemon.netinfo import tcp_listeners

    report: dict[str, Any] = dict(src.agent("/verify"))
    if not any(c.get("name") == "listeners" for c in report.get("checks", [])):
        # The agent did not look at the listeners: veilctl runs in the node's
        # namespace too, so it can.
        local = check_listeners(tcp_listeners())
        report["checks"] = [*report.get("checks", []), local.to_dict()]
        report["findings"] = [*report.get("findings", []), *(f.to_dict() for f in local.findings)]
        report["ok"] = not report["findings"]
    if args.output != "table":
        render_kv(report, args.output, out)
    else:
        out.write("\n".join(verify_lines(report)) + "\n")
    return EXIT_OK if not report.get("findings") else EXIT_FINDINGS
