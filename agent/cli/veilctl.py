"""``veilctl``: the node CLI for SREs. Reads the agent's status socket and the ztunnel admin API.

Every subcommand prints a readable table by default and the data itself with
``-o json``. Exit codes: 0 all good, 1 findings or an error, 2 usage,
3 a component could not be reached (the message says which and what to do).

The ``row_*`` and ``*_rows`` functions turn the JSON the components serve
into table rows; they are pure so they can be tested with canned documents.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from agent.cli.output import Column, render, render_kv
from agent.status.client import StatusClient, StatusUnavailable, get_json
from veil.errors import VeilError

__all__ = [
    "EXIT_FINDINGS",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
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

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
DEFAULT_AGENT_SOCKET = "/run/veil/agent.sock"
DEFAULT_ZTUNNEL_ADMIN = "127.0.0.1:15000"


class Unreachable(VeilError):
    """A component (agent or ztunnel) did not answer."""

    def __init__(self, component: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.component = component


class _Sources:
    """Where veilctl reads from; maps "cannot reach" into :class:`Unreachable`."""

    def __init__(self, agent_socket: str, ztunnel_admin: str) -> None:
        self.agent_socket = agent_socket
        host, _, port = ztunnel_admin.rpartition(":")
        if not host or not port.isdigit():
            raise VeilError(
                f"--ztunnel-admin {ztunnel_admin!r} is not HOST:PORT",
                hint="e.g. 127.0.0.1:15000",
            )
        self.zt_host, self.zt_port = host.strip("[]"), int(port)

    @staticmethod
    def _classify(component: str, exc: StatusUnavailable) -> VeilError:
        # StatusClient raises one class for both; only "cannot reach" means down.
        if exc.message.startswith("cannot reach"):
            return Unreachable(component, exc.message, hint=exc.hint)
        return exc

    def agent(self, path: str) -> Any:
        try:
            return StatusClient(self.agent_socket).get(path)
        except StatusUnavailable as exc:
            raise self._classify("agent", exc) from None

    def ztunnel(self, path: str = "/config_dump") -> Any:
        try:
            return get_json(self.zt_host, self.zt_port, path, "the ztunnel admin API")
        except StatusUnavailable as exc:
            raise self._classify("ztunnel", exc) from None


# -- formatting helpers --------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] if d else []
    if h or d:
        parts.append(f"{h}h")
    if m or h or d:
        parts.append(f"{m}m")
    parts.append(f"{s}s")
    return "".join(parts)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f} MiB"


def _drops(drops: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(drops.items()) if v)


# -- status --------------------------------------------------------------------------


def status_lines(
    agent: Mapping[str, Any] | None,
    ztunnel: Mapping[str, Any] | None,
    errors: Mapping[str, str],
    now: float | None = None,
) -> dict[str, Any]:
    """The ``veilctl status`` table (key -> value) from /status and /config_dump."""
    now = time.time() if now is None else now
    out: dict[str, Any] = {}
    if agent is None:
        out["agent"] = f"UNREACHABLE: {errors.get('agent', '')}"
    else:
        dp = agent.get("dataplane") or {}
        out["agent"] = (
            f"running, pid {agent.get('pid')}, version {agent.get('version')}, "
            f"up {_duration(agent.get('uptime_s'))}"
        )
        out["node"] = agent.get("node")
        out["agent cpu/rss"] = f"{agent.get('cpu_percent', 0):.1f}% / {_mib(agent.get('rss_bytes'))}"
        out["build"] = (
            f"{str(dp.get('loaded_build_id', ''))[:12]}"
            + ("" if dp.get("in_sync", True) else " (OUT OF SYNC with the agent's sources)")
        )
        out["programs"] = " ".join(f"{p['name']}={p['prog_id']}" for p in dp.get("programs", []))
        up = dp.get("uplink") or {}
        prog = up.get("program")
        out["uplink"] = (
            f"{up.get('ifname')} (program {prog['prog_id']})" if prog else
            f"{up.get('ifname')} (NOT ATTACHED)"
        )
        pr = dp.get("policy_routing") or {}
        keys = ("rule", "route", "rule6", "route6") if "rule6" in pr else ("rule", "route")
        out["policy routing"] = (
            "fwmark rule + local route" + (" (IPv4 + IPv6)" if "rule6" in pr else "")
            if all(pr.get(k) for k in keys) else
            "INCOMPLETE (" + ", ".join(f"{k}={'yes' if pr.get(k) else 'no'}" for k in keys) + ")"
        )
        pods = agent.get("pods") or {}
        out["pods"] = (
            f"{pods.get('entries', 0)} in the data plane, {pods.get('enrolled', 0)} enrolled, "
            f"{pods.get('protected', 0)} protected"
        )
        reg = agent.get("registry") or {}
        out["registry"] = (
            f"synced, version {reg.get('version')}, {reg.get('local_workloads')} local workloads"
            if reg.get("synced") else "NOT SYNCED (waiting for the controller)"
        )
        watch = agent.get("watch") or {}
        out["controller watch"] = (
            "connected" if watch.get("connected") else f"DOWN: {watch.get('last_error') or '-'}"
        )
        last = agent.get("last_reconcile")
        if last:
            out["last reconcile"] = (
                f"{_duration(now - float(last['at']))} ago, {last['duration_ms']} ms, "
                f"{len(last['actions'])} actions, {len(last['errors'])} errors, "
                f"{len(agent.get('pending', last['pending']))} pending"
            )
        else:
            out["last reconcile"] = "none yet"
        out["agent errors"] = len(agent.get("errors") or [])
    if ztunnel is None:
        out["ztunnel"] = f"UNREACHABLE: {errors.get('ztunnel', '')}"
    else:
        state = ztunnel.get("state") or {}
        ctl = ztunnel.get("controller") or {}
        out["ztunnel"] = "reachable"
        out["ztunnel state"] = (
            f"{'synced' if state.get('synced') else 'NOT SYNCED'}, version {state.get('version')}, "
            f"{sum(1 for w in ztunnel.get('workloads', []) if w.get('local'))} local workloads"
        )
        out["ztunnel controller"] = "connected" if ctl.get("connected") else (
            f"DOWN: {ctl.get('last_error') or '-'}"
        )
        out["ztunnel certificates"] = len(ztunnel.get("certificates") or [])
        out["ztunnel connections"] = len(ztunnel.get("connections") or [])
    return out


def ztunnel_summary(dump: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ztunnel part of ``veilctl status -o json``: health, not the whole config dump."""
    if dump is None:
        return None
    return {
        "node": dump.get("node"),
        "state": dump.get("state"),
        "controller": dump.get("controller"),
        "local_workloads": sum(1 for w in dump.get("workloads", []) if w.get("local")),
        "certificates": {
            state: sum(1 for c in dump.get("certificates", []) if c.get("state") == state)
            for state in ("valid", "pending", "expired")
        },
        "connections": len(dump.get("connections") or []),
    }


# -- tables ---------------------------------------------------------------------------


def pod_rows(pods: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for p in pods:
        progs = p.get("programs") or {}
        red = p.get("redirected") or {}
        rows.append(
            {
                "pod": p.get("workload") or "-",
                "ip": p.get("ip"),
                "veth": p.get("veth"),
                "enrolled": p.get("enrolled"),
                "dataplane": p.get("dataplane"),
                "programs": f"in={progs.get('ingress') or '-'},eg={progs.get('egress') or '-'}",
                "redirected": f"{red.get('outbound', 0)}/{red.get('inbound', 0)}",
                "dropped": str(p.get("dropped", 0))
                + (f" ({_drops(p.get('drops') or {})})" if p.get("dropped") else ""),
                "state": p.get("state"),
            }
        )
    return rows


POD_COLUMNS = (
    Column("POD", "pod"), Column("IP", "ip"), Column("VETH", "veth"),
    Column("ENROLLED", "enrolled"), Column("DATAPLANE", "dataplane"),
    Column("PROGRAMS", "programs"), Column("REDIRECTED(OUT/IN)", "redirected"),
    Column("DROPPED", "dropped"), Column("STATE", "state"),
)


def workload_rows(workloads: Sequence[Mapping[str, Any]], local_only: bool) -> list[dict[str, Any]]:
    return [
        {
            "workload": w.get("key"),
            "identity": w.get("identity"),
            "ips": w.get("ips"),
            "node": w.get("node"),
            "enrolled": w.get("enrolled"),
            "ready": w.get("ready"),
        }
        for w in workloads
        if not local_only or w.get("local", True)
    ]


def _rule_text(rule: Mapping[str, Any]) -> str:
    parts = []
    for src in rule.get("from", []):
        s = src.get("source", {})
        parts.append("from " + " ".join(f"{k}={','.join(map(str, v))}" for k, v in sorted(s.items())))
    for dst in rule.get("to", []):
        o = dst.get("operation", {})
        parts.append("to " + " ".join(f"{k}={','.join(map(str, v))}" for k, v in sorted(o.items())))
    return "; ".join(parts) or "any"


def policy_rows(policies: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "policy": p.get("key"),
            "action": p.get("action"),
            "selector": p.get("selector") if p.get("selector") is not None else "(namespace)",
            "rules": " | ".join(_rule_text(r) for r in p.get("rules", [])) or "(none: matches nothing)",
        }
        for p in policies
    ]


def cert_rows(certs: Sequence[Mapping[str, Any]], now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or datetime.now(UTC)
    rows = []
    for c in certs:
        due = c.get("rotation_due")
        rotation = "-"
        if due:
            at = datetime.fromisoformat(str(due))
            rotation = f"{due} (due)" if at <= now else str(due)
        rows.append(
            {
                "identity": c.get("identity"),
                "state": c.get("state"),
                "serial": c.get("serial"),
                "not_after": c.get("not_after"),
                "rotation": rotation,
                "error": c.get("last_error"),
            }
        )
    return rows


def connection_rows(conns: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "direction": c.get("direction"),
            "src": f"{c.get('src')} {c.get('src_workload') or ''}".strip(),
            "src_identity": c.get("src_identity"),
            "dst": f"{c.get('dst')} {c.get('dst_workload') or ''}".strip(),
            "dst_identity": c.get("dst_identity"),
            "bytes": f"{c.get('bytes_received', 0)}/{c.get('bytes_sent', 0)}",
            "duration": _duration(c.get("duration_s")),
            "verdict": c.get("verdict"),
        }
        for c in conns
        if "error" not in c
    ]


def verify_lines(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for c in report.get("checks", []):
        lines.append(f"{'ok  ' if c.get('ok') else 'FAIL'}  {c.get('name'):<15} {c.get('detail')}")
    findings = report.get("findings", [])
    if findings:
        lines.append("")
        lines.append(f"{len(findings)} finding(s):")
        for f in findings:
            lines.append(f"  [{f['check']}] {f['subject']}: {f['problem']}")
            lines.append(f"      fix: {f['fix']}")
    else:
        lines.append("")
        lines.append("no findings: every enrolled pod is steered into the ztunnel")
    return lines


# -- commands ------------------------------------------------------------------------


def _cmd_status(src: _Sources, args: argparse.Namespace, out: TextIO) -> int:
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
    if args.output == "json":
        render_kv({"agent": agent, "ztunnel": ztunnel_summary(zt), "errors": errors}, "json", out)
    else:
        render_kv(status_lines(agent, zt, errors), "table", out)
    for down in unreachable:
        print(f"\n{down.component} unreachable: {down.hint}", file=sys.stderr)
    return EXIT_UNREACHABLE if unreachable else EXIT_OK


def _cmd_pods(src: _Sources, args: argparse.Namespace, out: TextIO) -> int:
    pods = src.agent("/pods")
    if args.output == "json":
        render(pods, (), "json", out)
    else:
        render(pod_rows(pods), POD_COLUMNS, "table", out, empty="(no local pods)")
    return EXIT_OK


def _inspect_pins(args: argparse.Namespace) -> Any:
    from agent.bpf import DataplaneView

    return DataplaneView.inspect(args.pin_dir)


def _cmd_bpf_maps(src: _Sources, args: argparse.Namespace, out: TextIO) -> int:
    try:
        data = src.agent("/bpf/maps")
    except Unreachable as down:
        # The maps are pinned: readable straight from bpffs with the agent down.
        try:
            with _inspect_pins(args) as view:
                data = {"pin_dir": str(view.pin_dir), **view.maps_dump().to_dict()}
        except VeilError:
            raise down from None
        print(f"(agent unreachable: read the pins in {args.pin_dir} directly)", file=sys.stderr)
    if args.output == "json":
        render_kv(data, "json", out)
        return EXIT_OK
    out.write(f"pin dir: {data.get('pin_dir')}\n\nconfig:\n")
    for k, v in sorted((data.get("config") or {}).items()):
        out.write(f"  {k}: {v if v not in (None, '') else '-'}\n")
    out.write("\npods (ifindex -> pod address):\n")
    render(data.get("pods", []), (Column("IFINDEX", "ifindex"), Column("IP", "ip"),
           Column("ENROLLED", "enrolled"), Column("FLAGS", "flags")), "table", out)
    out.write("\npod_addrs (ifindex -> every source address the pod may use):\n")
    render(data.get("pod_addrs", []), (Column("IFINDEX", "ifindex"), Column("FAMILY", "family"),
           Column("IP", "ip")), "table", out)
    out.write("\nlocal_ips, local_ips6 (enrolled address -> ifindex):\n")
    render(data.get("local_ips", []), (Column("IP", "ip"), Column("IFINDEX", "ifindex")),
           "table", out)
    out.write("\ncounters:\n")
    counters = [
        {"ifindex": k, "out": v.get("outbound_redirected"), "in": v.get("inbound_redirected"),
         "established": v.get("established"), "drops": _drops(v.get("drops") or {}) or "-"}
        for k, v in sorted((data.get("counters") or {}).items(), key=lambda kv: int(kv[0]))
    ]
    render(counters, (Column("IFINDEX", "ifindex"), Column("REDIRECTED_OUT", "out"),
           Column("REDIRECTED_IN", "in"), Column("ESTABLISHED", "established"),
           Column("DROPS", "drops")), "table", out)
    return EXIT_OK


def _cmd_bpf_source(src: _Sources, args: argparse.Namespace, out: TextIO) -> int:
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
        data = {"build_id": unit.build_id, "cflags": list(unit.cflags),
                "files": [str(f.path) for f in unit.files], "source": unit.render()}
    if args.output == "json":
        render_kv(data, "json", out)
    else:
        out.write(str(data.get("source", "")))
        out.write("\n")
    return EXIT_OK


def _cmd_workloads(src: _Sources, args: argparse.Namespace, out: TextIO) -> int:
    try:
        rows = workload_rows(src.ztunnel().get("workloads", []), local_only=not args.all)
    except Unreachable:
        if args.all:
            raise
        rows = workload_rows(src.agent("/workloads"), local_only=False)
        print("(ztunnel unreachable: local workloads as the agent sees them)", file=sys.stderr)
    render(rows, (Column("WORKLOAD", "workload"), Column("IDENTITY", "identity"),
           Column("IPS", "ips"), Column("NODE", "node"), Column("ENROLLED", "enrolled"),
           Column("READY", "ready")), args.output, out, empty="(no workloads)")
    return EXIT_OK


def _cmd_policies(src: _Sources, args: argparse.Namespace, out: TextIO) -> int:
    dump = src.ztunnel()
    policies = dump.get("policies", [])
    peer = dump.get("peer_authentications", [])
    if args.output == "json":
        render_kv({"authorization_policies": policies, "peer_authentications": peer}, "json", out)
        return EXIT_OK
    render(policy_rows(policies), (Column("POLICY", "policy"), Column("ACTION", "action"),
           Column("SELECTOR", "selector"), Column("RULES", "rules")), "table", out,
           empty="(no authorization policies)")
    out.write("\n")
    render([{"key": a.get("key"), "mode": a.get("mode"),
             "selector": a.get("selector") if a.get("selector") is not None else "(namespace)"}
            for a in peer], (Column("PEER AUTHENTICATION", "key"), Column("MODE", "mode"),
           Column("SELECTOR", "selector")), "table", out, empty="(no peer authentications)")
    return EXIT_OK


def _cmd_certs(src: _Sources, args: argparse.Namespace, out: TextIO) -> int:
    certs = src.ztunnel().get("certificates", [])
    if args.output == "json":
        render(certs, (), "json", out)
    else:
        render(cert_rows(certs), (Column("IDENTITY", "identity"), Column("STATE", "state"),
               Column("SERIAL", "serial"), Column("EXPIRES", "not_after"),
               Column("ROTATION", "rotation"), Column("LAST ERROR", "error")), "table", out,
               empty="(no workload certificates)")
    return EXIT_OK


def _cmd_connections(src: _Sources, args: argparse.Namespace, out: TextIO) -> int:
    conns = src.ztunnel().get("connections", [])
    if args.output == "json":
        render(conns, (), "json", out)
    else:
        render(connection_rows(conns), (Column("DIR", "direction"), Column("SOURCE", "src"),
               Column("SOURCE IDENTITY", "src_identity"), Column("DESTINATION", "dst"),
               Column("DESTINATION IDENTITY", "dst_identity"),
               Column("BYTES(IN/OUT)", "bytes"), Column("AGE", "duration"),
               Column("VERDICT", "verdict")), "table", out, empty="(no live connections)")
    return EXIT_OK


def _cmd_verify(src: _Sources, args: argparse.Namespace, out: TextIO) -> int:
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
    if args.output == "json":
        render_kv(report, "json", out)
    else:
        out.write("\n".join(verify_lines(report)) + "\n")
    return EXIT_OK if not report.get("findings") else EXIT_FINDINGS


# -- parser ---------------------------------------------------------------------------

_Handler = Callable[[_Sources, argparse.Namespace, TextIO], int]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veilctl",
        description="Inspect Veil on this node: pods, BPF state, workloads, policies, "
        "certificates, connections. Exit codes: 0 ok, 1 findings/error, 2 usage, "
        "3 component unreachable.",
    )
    parser.add_argument(
        "--agent-socket", default=os.environ.get("VEIL_AGENT_SOCKET", DEFAULT_AGENT_SOCKET),
        help=f"the agent's status socket (default {DEFAULT_AGENT_SOCKET}; env VEIL_AGENT_SOCKET)",
    )
    parser.add_argument(
        "--ztunnel-admin", default=os.environ.get("VEIL_ZTUNNEL_ADMIN", DEFAULT_ZTUNNEL_ADMIN),
        help=f"the ztunnel admin API HOST:PORT (default {DEFAULT_ZTUNNEL_ADMIN}; "
        "env VEIL_ZTUNNEL_ADMIN)",
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", choices=["table", "json"], default="table",
                        help="output format (default: table)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: _Handler, help: str, into: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = into.add_parser(name, help=help, parents=[output])
        p.set_defaults(handler=handler)
        return p

    add("status", _cmd_status, "agent and ztunnel health, programs attached, versions")
    add("pods", _cmd_pods, "local pods: address, veth, enrollment, programs, counters")
    bpf = sub.add_parser("bpf", help="BPF state: pinned maps and the compiled source")
    bsub = bpf.add_subparsers(dest="bpf_command", metavar="COMMAND", required=True)
    from agent.bpf.pins import DEFAULT_PIN_DIR

    for name, handler, text in (
        ("maps", _cmd_bpf_maps, "dump the pinned maps"),
        ("source", _cmd_bpf_source, "the exact source compiled, with its -D flags"),
    ):
        p = add(name, handler, text, bsub)
        p.add_argument("--pin-dir", default=os.environ.get("VEIL_PIN_DIR", str(DEFAULT_PIN_DIR)),
                       help="read the pins here when the agent is down (env VEIL_PIN_DIR)")
    w = add("workloads", _cmd_workloads, "local workloads (ztunnel view, else the agent's)")
    w.add_argument("--all", action="store_true", help="every workload in the mesh, not only local")
    add("policies", _cmd_policies, "authorization policies and peer authentication")
    add("certs", _cmd_certs, "workload certificates: identity, serial, expiry, rotation")
    add("connections", _cmd_connections, "live connections through the ztunnel")
    add("verify", _cmd_verify, "audit: exits 1 when any enrolled pod could bypass the mesh")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    stream = out or sys.stdout
    try:
        src = _Sources(args.agent_socket, args.ztunnel_admin)
        handler: _Handler = args.handler
        return handler(src, args, stream)
    except Unreachable as exc:
        print(f"error: {exc.component} unreachable: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except VeilError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return EXIT_FINDINGS
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
