"""``veil controller`` and ``veil node``: the identity side of the ``veil`` CLI.

``veil controller``
  ``run`` (the controller process, from :mod:`controller.server`),
  ``status`` (a running controller's health endpoint: phase, each watched kind),
  ``token create|list|revoke`` (join tokens), ``ca init|show|rotate`` (the CA).
``veil node``
  ``join`` (token -> node certificate), ``certificate`` (a workload SVID over
  mTLS, PEM on stdout), ``renew`` (a new node certificate), ``status``.

Handlers raise :class:`~veil.errors.VeilError` subclasses; the
dispatcher in :mod:`cli.veil` prints them with their hint and exits 1.
Tables by default, stable JSON with ``-o json``; data goes to stdout, notes for
humans to stderr, so ``veil controller token create ... > token`` works.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.api.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from controller.errors import ControllerError

__all__ = ["add_controller_parser", "add_node_parser", "format_duration", "parse_duration"]

if TYPE_CHECKING:
    _Sub = argparse._SubParsersAction[argparse.ArgumentParser]
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``1h30m``, ``2d`` -> timedelta (positive)."""
    text = text.strip()
    if text.isdigit():
        seconds = int(text)
    else:
        m = _DURATION_RE.match(text)
        if not text or m is None:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}: use e.g. 90s, 15m, 1h30m or 2d"
            )
        seconds = sum(int(v) * _UNITS[u] for v, u in zip(m.groups(), "dhms", strict=True) if v)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be positive")
    return timedelta(seconds=seconds)


def format_duration(d: timedelta) -> str:
    seconds = int(d.total_seconds())
    parts = []
    for unit, size in _UNITS.items():
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(r.get(k) if r.get(k) is not None else "-") for _, k in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (h, _), w in zip(columns, widths, strict=True)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o", "--output", choices=["table", "json"], default="table", help="output format"
    )


def _add_state_dir(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--state-dir", type=Path, required=True, help=f"the {what} state directory")


def _add_ca_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-cert", type=Path, help="user-supplied signing CA certificate (PEM)")
    p.add_argument("--ca-key", type=Path, help="its private key (PEM, unencrypted)")
    p.add_argument(
        "--ca-chain", type=Path, help="certificates above --ca-cert up to the self-signed root"
    )


# ----- veil controller -------------------------------------------------------


def _cmd_token_create(args: argparse.Namespace) -> int:
    from controller.api.ports import CONTROLLER_JOIN_PORT
    from controller.auth import JoinTokenStore
    from controller.ca import CertificateAuthority

    ca = CertificateAuthority.load(args.state_dir)
    store = JoinTokenStore(args.state_dir)
    token = store.create(args.node, args.ttl, ca_fingerprint=ca.fingerprint)
    info = next(t for t in store.list() if token.split(".")[1] == t.token_id)
    if args.output == "json":
        _print_json(
            {
                "token": token,
                "id": info.token_id,
                "node": info.node,
                "expires": _iso(info.expires),
                "ca_sha256": info.ca_fingerprint,
            }
        )
        return 0
    print(token)
    _note(
        f"join token {info.token_id} for node {info.node!r}, single use, expires "
        f"{_iso(info.expires)}.\non the node run: veil node join --controller "
        f"<controller-host>:{CONTROLLER_JOIN_PORT} --node {info.node} --token <token> "
        "--state-dir <dir>"
    )
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    from controller.auth import JoinTokenStore
    from controller.ca import utc_now

    now = utc_now()
    rows = [
        {
            "id": t.token_id,
            "node": t.node,
            "state": t.state(now),
            "created": _iso(t.created),
            "expires": _iso(t.expires),
            "used_at": _iso(t.used_at),
        }
        for t in JoinTokenStore(args.state_dir).list()
    ]
    if args.output == "json":
        _print_json(rows)
    else:
        _print_table(
            rows,
            [
                ("ID", "id"),
                ("NODE", "node"),
                ("STATE", "state"),
                ("EXPIRES", "expires"),
                ("USED", "used_at"),
            ],
        )
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    from controller.auth import JoinTokenStore

    if not JoinTokenStore(args.state_dir).revoke(args.id):
        raise ControllerError(
            f"no join token {args.id!r} in {args.state_dir}",
            hint="list tokens with `veil controller token list --state-dir DIR`",
        )
    _note(f"revoked join token {args.id}")
    return 0


def _ca_rows(ca: Any) -> list[dict[str, Any]]:
    return [
        {
            "fingerprint": a.fingerprint,
            "state": a.state,
            "subject": a.subject,
            "not_before": _iso(a.not_before),
            "not_after": _iso(a.not_after),
            "retire_after": _iso(a.retire_after),
            "source": a.source,
            "created": _iso(a.created),
            "retired_at": _iso(a.retired_at),
            "intermediates": a.intermediates,
        }
        for a in ca.authorities()
    ]


def _cmd_ca_show(args: argparse.Namespace) -> int:
    from controller.ca import CertificateAuthority

    ca = CertificateAuthority.load(args.state_dir)
    rows = _ca_rows(ca)
    if args.output == "json":
        _print_json({"trust_domain": ca.trust_domain, "roots": rows})
        return 0
    print(f"trust domain: {ca.trust_domain}")
    _print_table(
        rows,
        [
            ("FINGERPRINT (SHA-256)", "fingerprint"),
            ("STATE", "state"),
            ("SUBJECT", "subject"),
            ("NOT BEFORE", "not_before"),
            ("NOT AFTER", "not_after"),
            ("RETIRE AFTER", "retire_after"),
            ("SOURCE", "source"),
        ],
    )
    return 0


def _cmd_ca_init(args: argparse.Namespace) -> int:
    from controller.ca import CertificateAuthority

    ca = CertificateAuthority.load_or_create(
        args.state_dir,
        args.trust_domain,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
        ca_chain=args.ca_chain,
    )
    print(ca.fingerprint)
    _note(f"CA for trust domain {ca.trust_domain} ready in {args.state_dir}")
    return 0


def _cmd_ca_rotate(args: argparse.Namespace) -> int:
    from controller.ca import CertificateAuthority

    ca = CertificateAuthority.load(args.state_dir)
    before = ca.fingerprint
    new = ca.rotate(ca_cert=args.ca_cert, ca_key=args.ca_key, ca_chain=args.ca_chain)
    print(new.fingerprint)
    old = next((a for a in ca.authorities() if a.fingerprint == before), None)
    if old is None or old.fingerprint == new.fingerprint:
        _note(f"new active root {new.fingerprint}; the previous root signed nothing still valid")
    else:
        _note(
            f"new active root {new.fingerprint}; previous root {old.fingerprint} stays in the "
            f"trust bundle until {_iso(old.retire_after)}.\nA running controller picks this up "
            "within seconds. Join tokens created before now pin the old root: create new ones."
        )
    return 0


# `veil controller status` exit codes: 0 ready, 2 ready but degraded, 3 not ready
# (an unreachable endpoint is an error: exit 1 with a hint).
STATUS_DEGRADED = 2
STATUS_NOT_READY = 3


def _cmd_status(args: argparse.Namespace) -> int:
    from controller.config import ListenAddress, parse_listen_address
    from controller.health import DEFAULT_HEALTH_PORT, fetch_health

    text = args.health_addr or os.environ.get("VEIL_HEALTH_ADDR") or ""
    try:
        addr = parse_listen_address(text or f"127.0.0.1:{DEFAULT_HEALTH_PORT}", DEFAULT_HEALTH_PORT)
    except ValueError as e:
        raise ControllerError(f"--health-addr: {e}", hint="use HOST:PORT") from None
    if addr.host in ("0.0.0.0", "::"):
        addr = ListenAddress("127.0.0.1" if addr.host == "0.0.0.0" else "::1", addr.port)
    try:
        _, doc = fetch_health(addr, timeout=args.timeout)
    except OSError as e:
        raise ControllerError(
            f"no controller health endpoint at {addr}: {e}",
            hint="is `veil controller run` running on this host? pass its --health-addr",
        ) from None
    ready, degraded = bool(doc.get("ready")), bool(doc.get("degraded"))
    if args.output == "json":
        _print_json(doc)
    else:
        word = "ready" if ready else "NOT READY"
        if ready and degraded:
            word = "ready (degraded)"
        print(f"controller: {word}; phase {doc.get('phase')}: {doc.get('detail') or '-'}")
        checks = [c for c in doc.get("checks") or [] if isinstance(c, dict)]
        if checks:
            rows = [
                {
                    **c,
                    "need": "required" if c.get("required") else "optional",
                    "why": c.get("detail") or "",
                }
                for c in checks
            ]
            _print_table(
                rows, [("KIND", "name"), ("NEED", "need"), ("STATE", "state"), ("DETAIL", "why")]
            )
            for c in checks:
                if not c.get("ok") and c.get("hint"):
                    _note(f"{c.get('name')}: {c.get('hint')}")
    if not ready:
        return STATUS_NOT_READY
    return STATUS_DEGRADED if degraded else 0


def _run_unavailable(args: argparse.Namespace) -> int:
    raise ControllerError(
        "this installation has no controller server module (controller.server)",
        hint="reinstall Veil; the identity commands (token, ca) still work",
    )


def add_controller_parser(sub: _Sub) -> None:
    """Adds ``veil controller ...`` to the top-level subparsers."""
    ctl = sub.add_parser(
        "controller", help="the Veil controller: run it, manage join tokens and the CA"
    )
    csub = ctl.add_subparsers(dest="controller_command", metavar="COMMAND", required=True)

    run = csub.add_parser("run", help="run the controller (registry, CA, gRPC API)")
    try:
        # Imported here so the identity commands work without the server's dependencies.
        runner: Any = importlib.import_module("controller.run")
    except ImportError:
        run.set_defaults(func=_run_unavailable)
    else:
        runner.add_run_arguments(run)
        run.set_defaults(func=runner.run_controller)

    status = csub.add_parser(
        "status",
        help="a running controller's readiness and, in Kubernetes mode, each watched kind "
        "(exit 0 ready, 2 degraded, 3 not ready)",
    )
    status.add_argument(
        "--health-addr",
        default=None,
        help="the controller's --health-addr (default 127.0.0.1:15014; env VEIL_HEALTH_ADDR)",
    )
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    _add_output(status)
    status.set_defaults(func=_cmd_status)

    token = csub.add_parser("token", help="join tokens for nodes (standalone mode)")
    tsub = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = tsub.add_parser("create", help="create a single-use join token bound to a node name")
    create.add_argument("--node", required=True, help="the node name the token is bound to")
    create.add_argument(
        "--ttl", type=parse_duration, default=timedelta(hours=1), help="lifetime (default 1h)"
    )
    _add_state_dir(create, "controller")
    _add_output(create)
    create.set_defaults(func=_cmd_token_create)
    lst = tsub.add_parser("list", help="list join tokens (secrets are not stored)")
    _add_state_dir(lst, "controller")
    _add_output(lst)
    lst.set_defaults(func=_cmd_token_list)
    revoke = tsub.add_parser("revoke", help="delete a join token before it is used")
    revoke.add_argument("id", help="the token id (second field of the token)")
    _add_state_dir(revoke, "controller")
    revoke.set_defaults(func=_cmd_token_revoke)

    ca = csub.add_parser("ca", help="the controller's certificate authority")
    casub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    init = casub.add_parser(
        "init", help="create the CA (or import one) without starting the controller"
    )
    _add_state_dir(init, "controller")
    init.add_argument(
        "--trust-domain", default=os.environ.get("VEIL_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN)
    )
    _add_ca_files(init)
    init.set_defaults(func=_cmd_ca_init)
    show = casub.add_parser("show", help="show the roots in the trust bundle")
    _add_state_dir(show, "controller")
    _add_output(show)
    show.set_defaults(func=_cmd_ca_show)
    rotate = casub.add_parser(
        "rotate", help="add a new root and sign with it; the old one retires when its certs expire"
    )
    _add_state_dir(rotate, "controller")
    _add_ca_files(rotate)
    rotate.set_defaults(func=_cmd_ca_rotate)


# ----- veil node -------------------------------------------------------------


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ControllerError(
            f"cannot read the {what} file {path}: {e.strerror}",
            hint="check the path and that the volume holding it is mounted",
        ) from None


def _cmd_node_join(args: argparse.Namespace) -> int:
    from node import join

    token = args.token or os.environ.get("VEIL_JOIN_TOKEN", "")
    if args.token_file:
        token = _read_file(args.token_file, "token").decode().strip()
    if not token:
        raise ControllerError(
            "no join token given",
            hint="pass --token, --token-file or set VEIL_JOIN_TOKEN (keeps it out of ps)",
        )
    ca_pem = _read_file(args.ca_file, "CA") if args.ca_file else None
    creds = asyncio.run(
        join(
            args.controller,
            token,
            args.node,
            args.state_dir,
            mtls_address=args.controller_mtls,
            trust_domain=args.trust_domain,
            timeout=args.timeout,
            ca_pem=ca_pem,
        )
    )
    _note(
        f"joined as {creds.identity}; node certificate valid until {_iso(creds.not_after)}; "
        f"controller {creds.controller_address}; credentials in {args.state_dir}"
    )
    return 0


def _cmd_node_certificate(args: argparse.Namespace) -> int:
    from node import load_node_credentials, request_certificate
    from veil.files import atomic_write

    identity = SpiffeId.parse(args.identity)
    creds = load_node_credentials(args.state_dir)
    ttl = int(args.ttl.total_seconds()) if args.ttl else 0
    key, chain = asyncio.run(request_certificate(creds, identity, ttl, args.timeout))
    if args.key_out is not None:
        try:
            atomic_write(args.key_out, key, 0o600)
        except OSError as e:
            raise ControllerError(f"cannot write the key to {args.key_out}: {e.strerror}") from None
    sys.stdout.write(b"".join(chain).decode())
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(chain[0])
    _note(f"issued {identity}, valid until {_iso(leaf.not_valid_after_utc)}")
    return 0


def _cmd_node_renew(args: argparse.Namespace) -> int:
    from node import renew_node_certificate

    creds = asyncio.run(renew_node_certificate(args.state_dir, args.timeout))
    _note(f"renewed {creds.identity}; valid until {_iso(creds.not_after)}")
    return 0


def _cmd_node_status(args: argparse.Namespace) -> int:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from node import load_node_credentials

    creds = load_node_credentials(args.state_dir)
    roots = [
        hashlib.sha256(
            x509.load_pem_x509_certificate(r).public_bytes(serialization.Encoding.DER)
        ).hexdigest()
        for r in creds.trust_bundle_pem
    ]
    data = {
        "node": creds.node,
        "identity": str(creds.identity),
        "trust_domain": creds.trust_domain,
        "controller": creds.controller_address,
        "join_controller": creds.join_address,
        "not_after": _iso(creds.not_after),
        "trust_bundle": roots,
    }
    if args.output == "json":
        _print_json(data)
    else:
        width = max(len(k) for k in data)
        for k, v in data.items():
            print(f"{k.ljust(width)}  {', '.join(v) if isinstance(v, list) else v}")
    return 0


def _add_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to keep trying the controller (join retries until then)",
    )


def add_node_parser(sub: _Sub) -> None:
    """Adds ``veil node ...`` to the top-level subparsers."""
    node = sub.add_parser("node", help="this node's identity: join the mesh, request certificates")
    nsub = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)

    join = nsub.add_parser("join", help="exchange a join token for a node certificate")
    join.add_argument(
        "--controller",
        required=True,
        help="the controller's join listener, HOST[:PORT] (default port 15013)",
    )
    join.add_argument("--token", help="the join token (or env VEIL_JOIN_TOKEN)")
    join.add_argument(
        "--token-file",
        help="read the token from a file, e.g. a projected ServiceAccount token (Kubernetes mode)",
    )
    join.add_argument(
        "--ca-file",
        help="trust these PEM roots instead of pinning the CA from a join token "
        "(Kubernetes mode: the veil-ca-root ConfigMap)",
    )
    join.add_argument("--node", required=True, help="this node's name, as bound to the token")
    join.add_argument(
        "--controller-mtls",
        help="the main mTLS listener HOST:PORT (default: the address the controller "
        "reports at join)",
    )
    join.add_argument(
        "--trust-domain",
        help="the mesh trust domain (default: read from the controller's certificate)",
    )
    _add_state_dir(join, "node")
    _add_timeout(join)
    join.set_defaults(func=_cmd_node_join)

    cert = nsub.add_parser(
        "certificate", help="request a workload certificate; prints the PEM chain to stdout"
    )
    _add_state_dir(cert, "node")
    cert.add_argument("--identity", required=True, help="spiffe://<td>/ns/<ns>/sa/<sa>")
    cert.add_argument(
        "--ttl", type=parse_duration, help="requested lifetime (default: controller's)"
    )
    cert.add_argument("--key-out", type=Path, help="write the new private key here (mode 0600)")
    _add_timeout(cert)
    cert.set_defaults(func=_cmd_node_certificate)

    renew = nsub.add_parser("renew", help="replace the node key and certificate")
    _add_state_dir(renew, "node")
    _add_timeout(renew)
    renew.set_defaults(func=_cmd_node_renew)

    status = nsub.add_parser("status", help="show this node's identity and trust bundle")
    _add_state_dir(status, "node")
    _add_output(status)
    status.set_defaults(func=_cmd_node_status)
