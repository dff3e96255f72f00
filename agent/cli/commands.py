"""veilctl's inspection verbs beyond the core tables: services, config, certs
(with chains and PEM), policy what-if, runtime log levels, the live monitor,
versions, and the reason a pin directory holds nothing.

Each ``cmd_*`` takes the :class:`~.sources.Sources`, the parsed arguments and
the output stream and returns an exit code; the pure parts (chain decoding,
pin diagnosis, monitor lines) are separate functions with unit tests.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import json
import os
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.cli.controller_version import DEFAULT_NODE_STATE_DIR, fetch_controller_version
from agent.cli.filters import RowFilter
from agent.cli.output import Column, dump_data, render, rfc3339
from agent.cli.rows import cert_rows, service_rows
from agent.cli.sources import Sources, Unreachable
from agent.cli.whatif import (
    check,
    check_lines,
    resolve_destination,
    resolve_source,
    snapshot_from_dump,
)
from veil.errors import VeilError

__all__ = [
    "chain_info",
    "client_version",
    "cmd_certs",
    "cmd_config",
    "cmd_log",
    "cmd_monitor",
    "cmd_policy_check",
    "cmd_services",
    "monitor_line",
    "monitor_query",
    "pin_dir_problem",
    "row_filter",
    "versions",
]

BPF_FS_MAGIC = 0xCAFE4A11


def row_filter(args: argparse.Namespace) -> RowFilter:
    return RowFilter(getattr(args, "namespace", None), getattr(args, "workload", None))


def client_version() -> str:
    try:
        return importlib.metadata.version("veil-mesh")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- services and config ----------------------------------------------------------------


def cmd_services(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    dump = src.ztunnel()
    services = row_filter(args).services(dump.get("services") or [])
    if args.output != "table":
        dump_data(list(services), args.output, out)
        return 0
    render(
        service_rows(services, dump.get("workloads") or []),
        (
            Column("SERVICE", "service"),
            Column("VIPS", "vips"),
            Column("PORTS", "ports"),
            Column("ENDPOINTS", "endpoints"),
        ),
        "table",
        out,
        empty="(no services)",
    )
    return 0


def cmd_config(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    """The full dump: the ztunnel's config_dump and the agent's view, side by side."""
    doc: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for component, path in (("ztunnel", "/config_dump"), ("agent", "/status")):
        try:
            doc[component] = src.get(component, path)
        except Unreachable as e:
            errors[component] = e.message
    if not doc:
        raise Unreachable(
            "agent and ztunnel",
            "; ".join(errors.values()),
            hint="run veilctl on a node where Veil runs",
        )
    doc["errors"] = errors
    # A dump is data, not a table: YAML by default (readable), JSON on request.
    dump_data(doc, "yaml" if args.output == "table" else args.output, out)
    return 0 if not errors else 3


# -- certificates -------------------------------------------------------------------------


def chain_info(pems: Sequence[str]) -> list[dict[str, Any]]:
    """Subject, issuer, serial and validity (RFC 3339 UTC) of each PEM certificate."""
    out = []
    for block in pems:
        for cert in x509.load_pem_x509_certificates(block.encode()):
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
            except x509.ExtensionNotFound:
                uris = []
            try:
                ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                ca = False
            out.append(
                {
                    "subject": cert.subject.rfc4514_string() or "(empty)",
                    "issuer": cert.issuer.rfc4514_string() or "(empty)",
                    "uri_sans": list(uris),
                    "serial": format(cert.serial_number, "x"),
                    "ca": ca,
                    "not_before": rfc3339(cert.not_valid_before_utc),
                    "not_after": rfc3339(cert.not_valid_after_utc),
                    "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
                }
            )
    return out


def cmd_certs(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    want_pem = args.chain or args.output == "pem"
    data = src.ztunnel("/certs?pem=1" if want_pem else "/certs")
    if isinstance(data, Mapping):
        certs: list[Mapping[str, Any]] = list(data.get("certificates") or [])
        roots: list[str] = list(data.get("trust_bundle_pem") or [])
    else:
        certs, roots = list(data), []
    workloads: list[Mapping[str, Any]] = []
    rf = row_filter(args)
    if rf.workload is not None:
        workloads = src.ztunnel().get("workloads") or []
    certs = rf.certificates(certs, workloads)
    if args.output == "pem":
        for c in certs:
            out.write(f"# {c.get('identity')}\n")
            out.write("".join(c.get("chain_pem") or []))
        if args.chain:
            out.write("# trust bundle\n" + "".join(roots))
        return 0
    if args.chain:
        full = [
            {
                "identity": c.get("identity"),
                "state": c.get("state"),
                "chain": [
                    {k: v for k, v in e.items() if k != "pem"}
                    for e in chain_info(c.get("chain_pem") or [])
                ],
            }
            for c in certs
        ]
        bundle = [{k: v for k, v in e.items() if k != "pem"} for e in chain_info(roots)]
        if args.output != "table":
            dump_data({"certificates": full, "trust_bundle": bundle}, args.output, out)
            return 0
        for c in full:
            out.write(f"{c['identity']} ({c['state']})\n")
            chain: list[dict[str, Any]] = list(c["chain"] or [])
            for depth, e in enumerate(chain):
                role = "leaf" if depth == 0 else ("ca" if e["ca"] else "cert")
                out.write(
                    f"  [{depth}] {role}: subject={e['subject']} issuer={e['issuer']}\n"
                    f"      serial={e['serial']} valid {e['not_before']} .. {e['not_after']}"
                    + (f" san={','.join(e['uri_sans'])}" if e["uri_sans"] else "")
                    + "\n"
                )
        out.write("trust bundle (roots):\n")
        for e in bundle:
            out.write(
                f"  subject={e['subject']} serial={e['serial']} valid {e['not_before']} .. {e['not_after']}\n"
            )
        if not bundle:
            out.write("  (none)\n")
        return 0
    if args.output != "table":
        dump_data(list(certs), args.output, out)
        return 0
    render(
        cert_rows(certs),
        (
            Column("IDENTITY", "identity"),
            Column("STATE", "state"),
            Column("SERIAL", "serial"),
            Column("EXPIRES", "not_after"),
            Column("ROTATION", "rotation"),
            Column("LAST ERROR", "error"),
        ),
        "table",
        out,
        empty="(no workload certificates)",
    )
    return 0


# -- policy what-if -----------------------------------------------------------------------


def cmd_policy_check(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    snapshot = snapshot_from_dump(src.ztunnel())
    dest, port = resolve_destination(snapshot, args.to)
    result = check(snapshot, resolve_source(snapshot, args.source), dest, port)
    if args.output != "table":
        dump_data(result, args.output, out)
    else:
        out.write("\n".join(check_lines(result)) + "\n")
    # Exit 1 for a deny, so scripts can assert reachability.
    return 0 if result["allowed"] else 1


# -- log levels -----------------------------------------------------------------------------


_LOG_PATHS = {"ztunnel": "/logging", "agent": "/logging"}


def cmd_log(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    targets = ["ztunnel", "agent"] if args.component == "all" else [args.component]
    result: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for target in targets:
        try:
            if args.level:
                result[target] = src.post(target, _LOG_PATHS[target], {"level": args.level})
            else:
                result[target] = src.get(target, _LOG_PATHS[target])
        except Unreachable as e:
            if len(targets) == 1:
                raise
            errors[target] = e.message
    if args.output != "table":
        dump_data({**result, "errors": errors}, args.output, out)
    else:
        for target, levels in result.items():
            comps = levels.get("components") or {}
            out.write(f"{target}: default={levels.get('default')}")
            out.write("".join(f" {k}={v}" for k, v in sorted(comps.items())) + "\n")
        for target, msg in errors.items():
            out.write(f"{target}: UNREACHABLE ({msg})\n")
    return 0 if not errors else 3


# -- monitor ----------------------------------------------------------------------------------


def monitor_line(e: Mapping[str, Any]) -> str:
    """One event as a line: ``TIME drop REASON pod=.. SRC -> DST`` or a deny."""
    when = e.get("time") or "-"
    if e.get("type") == "drop":
        pod = e.get("pod") or e.get("veth") or e.get("ifindex")
        if e.get("src") is None:  # the counter-based stream: no tuple, a count
            return f"{when} drop  {e.get('reason')} pod={pod} count={e.get('count')}"
        return (
            f"{when} drop  {e.get('reason')} pod={pod} "
            f"{e.get('src')} -> {e.get('dst')} {e.get('protocol', '')} ({e.get('program')})"
        ).rstrip()
    if e.get("type") == "deny":
        return (
            f"{when} deny  {e.get('src')} ({e.get('src_workload') or e.get('src_identity') or '?'}) -> "
            f"{e.get('dst')} ({e.get('dst_workload') or '?'}) policy={e.get('policy') or '-'}: "
            f"{e.get('reason')}"
        )
    if e.get("type") == "lost":
        return f"{when} lost  {e.get('count')} event(s) ({e.get('why') or 'rate limit or a slow reader'})"
    return f"{when} {e.get('type')} {e.get('error') or ''}".rstrip()


def _merge(streams: Sequence[Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """Interleaves several blocking streams with one reader thread each."""
    import queue
    import threading

    q: queue.SimpleQueue[dict[str, Any] | BaseException | None] = queue.SimpleQueue()

    def pump(it: Iterator[dict[str, Any]]) -> None:
        try:
            for item in it:
                q.put(item)
        except BaseException as e:  # handed to the main thread
            q.put(e)
        q.put(None)

    for it in streams:
        threading.Thread(target=pump, args=(it,), daemon=True).start()
    live = len(streams)
    while live:
        item = q.get()
        if item is None:
            live -= 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield item


def monitor_query(args: argparse.Namespace) -> str:
    """The agent filters drops itself (fewer events cross the socket): ``?follow=1&...``."""
    query = {"follow": "1"}
    for key, value in (
        ("namespace", getattr(args, "namespace", None)),
        ("pod", getattr(args, "workload", None)),
        ("reason", getattr(args, "reason", None)),
    ):
        if value:
            query[key] = value
    return "/monitor?" + urllib.parse.urlencode(query)


def _shown(event: Mapping[str, Any], rf: RowFilter, reason: str | None) -> bool:
    kind = event.get("type")
    if kind in ("heartbeat", "subscribed"):
        return False
    if kind == "lost":
        return True  # about the stream itself, whatever the filter
    if reason is not None and kind == "drop" and event.get("reason") != reason:
        return False
    return rf.event(event)


def cmd_monitor(src: Sources, args: argparse.Namespace, out: TextIO) -> int:
    rf = row_filter(args)
    reason = getattr(args, "reason", None)
    streams: list[Iterator[dict[str, Any]]] = []
    if args.type in ("all", "drop"):
        streams.append(src.stream("agent", monitor_query(args), args.idle_timeout))
    if args.type in ("all", "deny"):
        streams.append(src.stream("ztunnel", "/denies?follow=1", args.idle_timeout))
    shown = 0
    try:
        for event in _merge(streams):
            if not _shown(event, rf, reason):
                continue
            if args.output == "table":
                out.write(monitor_line(event) + "\n")
            elif args.output == "json":
                out.write(json.dumps(event, sort_keys=True) + "\n")  # JSON Lines
            else:
                dump_data([event], "yaml", out)
            out.flush()
            shown += 1
            if args.count and shown >= args.count:
                break
    except KeyboardInterrupt:
        pass
    return 0


# -- versions -----------------------------------------------------------------------------------


def versions(
    src: Sources, controller_health: str | None = None, state_dir: Path | None = None
) -> dict[str, Any]:
    """The client's version and each reachable component's (None when unreachable).

    The controller is asked at ``controller_health`` or, failing that, at the
    host this node joined (``state_dir``) on the default health port.
    """
    out: dict[str, Any] = {"client": client_version()}
    for component, path, key in (
        ("agent", "/status", "version"),
        ("ztunnel", "/version", "version"),
    ):
        try:
            doc = src.get(component, path)
            out[component] = doc.get(key) if isinstance(doc, Mapping) else None
        except VeilError as e:
            out[component] = None
            out.setdefault("unreachable", {})[component] = e.message
    found = fetch_controller_version(controller_health, state_dir or DEFAULT_NODE_STATE_DIR)
    out["controller"] = found.version
    if found.error is not None:
        out.setdefault("unreachable", {})["controller"] = found.error
    return out


# -- pin directory diagnosis ------------------------------------------------------------------


def _is_bpffs(path: Path) -> bool | None:
    """True/False when /proc/self/mounts says whether ``path`` is on bpffs; None if unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", ""
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1]
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype == "bpf" if best else None


def pin_dir_problem(pin_dir: Path) -> str | None:
    """Why ``pin_dir`` holds no readable pins, in words; None when it has some."""
    bpffs = _is_bpffs(pin_dir.parent if not pin_dir.exists() else pin_dir)
    if not pin_dir.exists():
        if bpffs is False:
            return (
                f"{pin_dir} does not exist and no bpffs is mounted there "
                "(mount it: mount -t bpf bpf /sys/fs/bpf; the agent does this at start)"
            )
        return f"{pin_dir} does not exist: the agent has never loaded the data plane on this node"
    if not pin_dir.is_dir():
        return f"{pin_dir} is not a directory"
    if bpffs is False:
        return f"{pin_dir} is not on a bpffs mount: pins live on bpffs only (mount -t bpf bpf /sys/fs/bpf)"
    try:
        entries = list(pin_dir.iterdir())
    except PermissionError:
        return f"permission denied reading {pin_dir}: run veilctl as root (pins are root-only)"
    except OSError as e:
        if e.errno == errno.EACCES:
            return f"permission denied reading {pin_dir}: run veilctl as root"
        return f"cannot read {pin_dir}: {e.strerror or e}"
    if not entries:
        return f"{pin_dir} is empty: the agent unloaded the data plane (veil agent uninstall) or never ran"
    if not os.access(pin_dir, os.R_OK | os.X_OK) or os.geteuid() != 0:
        return f"pins exist in {pin_dir} but opening them needs root (CAP_BPF/CAP_SYS_ADMIN)"
    return None
