"""veilctl's newer verbs from canned documents: filters, YAML, JSON errors,
services, the policy what-if, certificate chains, pin diagnosis, the monitor
lines and the agent's drop deltas (no sockets)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.cli import veilctl
from agent.cli.commands import chain_info, monitor_line, pin_dir_problem
from agent.cli.filters import RowFilter, identity_namespace
from agent.cli.output import render, render_error, rfc3339
from agent.cli.rows import service_rows
from agent.cli.whatif import (
    WhatIfError,
    check,
    check_lines,
    resolve_destination,
    resolve_source,
    snapshot_from_dump,
)
from agent.status.monitor import drop_deltas
from controller.api.model import (
    AuthorizationPolicy,
    Condition,
    Labels,
    Namespace,
    Operation,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    Rule,
    Service,
    ServicePort,
    Source,
    TargetRef,
    Workload,
)
from node.loglevels import LogLevelError, apply_levels, logger_name, parse_level_spec
from node.state import build_snapshot
from ztunnel.admin.dump import config_dump


def mesh_dump() -> dict[str, object]:
    snap = build_snapshot(
        "node-a",
        [
            Namespace("shop"),
            Namespace("prod"),
            Workload("web", "shop", "web", "node-a", ("10.0.0.1",), Labels({"app": "web"})),
            Workload(
                "pay", "prod", "pay", "node-a", ("10.0.0.2", "fd00::2"), Labels({"app": "pay"})
            ),
            Workload("batch", "prod", "batch", "node-b", ("10.0.0.3",)),
            Service(
                "pay",
                "prod",
                ("10.96.0.2",),
                (ServicePort(80, 8080, "http"),),
                Labels({"app": "pay"}),
                ("prod/pay",),
            ),
            AuthorizationPolicy(
                "allow-web",
                "prod",
                PolicyAction.ALLOW,
                (
                    Rule(
                        (Source(principals=("cluster.local/ns/shop/sa/web",)),),
                        (Operation(ports=(8080,)),),
                    ),
                ),
                selector=Labels({"app": "pay"}),
            ),
            AuthorizationPolicy(
                "deny-batch",
                "prod",
                PolicyAction.DENY,
                (Rule((Source(principals=("cluster.local/ns/prod/sa/batch",)),)),),
            ),
            PeerAuthentication("strict", "prod", PeerAuthMode.STRICT),
        ],
        epoch="e",
        version=3,
        trust_bundle=None,
    )
    return config_dump(snap)


# -- output -------------------------------------------------------------------------------


def test_yaml_output_is_the_same_data_as_json() -> None:
    rows = [{"b": 1, "a": [1, 2]}, {"b": None, "a": []}]
    j, y = io.StringIO(), io.StringIO()
    render(rows, (), "json", j)
    render(rows, (), "yaml", y)
    assert yaml.safe_load(y.getvalue()) == json.loads(j.getvalue())


def test_errors_under_json_are_json_on_stdout() -> None:
    out, err = io.StringIO(), io.StringIO()
    render_error("json", "boom", hint="do x", exit_code=3, component="agent", out=out, err=err)
    assert json.loads(out.getvalue()) == {
        "error": {"message": "boom", "hint": "do x", "exit_code": 3, "component": "agent"}
    }
    assert err.getvalue() == ""


def test_veilctl_unreachable_agent_is_json_with_o_json(tmp_path: Path) -> None:
    out = io.StringIO()
    code = veilctl.main(["--agent-socket", str(tmp_path / "none.sock"), "pods", "-o", "json"], out)
    assert code == veilctl.EXIT_UNREACHABLE
    doc = json.loads(out.getvalue())
    assert doc["error"]["component"] == "agent" and doc["error"]["exit_code"] == 3


def test_usage_error_under_json_is_json_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        veilctl.main(["-o", "json", "nonsense"])
    assert err.value.code == 2
    assert json.loads(capsys.readouterr().out)["error"]["exit_code"] == 2


def test_rfc3339_is_one_format() -> None:
    assert rfc3339("2030-01-02T03:04:05.123+00:00") == "2030-01-02T03:04:05Z"
    assert rfc3339("2030-01-02T05:04:05+02:00") == "2030-01-02T03:04:05Z"
    assert rfc3339(0.0) == "1970-01-01T00:00:00Z"
    assert rfc3339(None) is None and rfc3339("garbage") == "garbage"


def test_help_shows_defaults_and_typed_metavars(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        veilctl.main(["--help"])
    text = capsys.readouterr().out
    assert "HOST:PORT" in text and "PATH" in text and "default: 127.0.0.1:15000" in text


def test_version_without_components(tmp_path: Path) -> None:
    out = io.StringIO()
    code = veilctl.main(
        ["--agent-socket", str(tmp_path / "x"), "--ztunnel-admin", "127.0.0.1:1", "--version"], out
    )
    assert code == 0
    assert out.getvalue().startswith("veilctl ") and "agent: unreachable" in out.getvalue()


# -- filters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ns", "wl", "key", "kept"),
    [
        (None, None, "a/b", True),
        ("a", None, "a/b", True),
        ("a", None, "c/b", False),
        (None, "b", "a/b", True),
        (None, "b", "a/c", False),
        ("c", "b", "a/b", False),
        ("c", "a/b", "a/b", True),  # a qualified workload names its namespace
        (None, "a/b", "x/b", False),
        ("a", None, None, False),
    ],
)
def test_row_filter_keys(ns: str | None, wl: str | None, key: str | None, kept: bool) -> None:
    assert RowFilter(ns, wl).key_matches(key) is kept


def test_filters_on_each_list() -> None:
    dump = mesh_dump()
    wls = dump["workloads"]
    assert [w["key"] for w in RowFilter("prod").workloads(wls)] == ["prod/batch", "prod/pay"]
    assert [p["key"] for p in RowFilter(None, "prod/pay").policies(dump["policies"], wls)] == [
        "prod/allow-web",
        "prod/deny-batch",
    ]
    assert RowFilter(None, "web").policies(dump["policies"], wls) == []
    assert [s["key"] for s in RowFilter(None, "pay").services(dump["services"])] == ["prod/pay"]
    assert RowFilter("shop").services(dump["services"]) == []
    certs = [
        {"identity": "spiffe://cluster.local/ns/prod/sa/pay"},
        {"identity": "spiffe://cluster.local/ns/shop/sa/web"},
    ]
    assert RowFilter("shop").certificates(certs, wls) == [certs[1]]
    assert RowFilter(None, "prod/pay").certificates(certs, wls) == [certs[0]]
    conns = [{"src_workload": "shop/web", "dst_workload": "prod/pay"}]
    assert RowFilter(None, "web").connections(conns) == conns
    assert RowFilter("other").connections(conns) == []
    assert identity_namespace("spiffe://td/ns/x/sa/y") == "x"


def test_service_rows_show_vips_ports_and_endpoint_ips() -> None:
    dump = mesh_dump()
    [row] = service_rows(dump["services"], dump["workloads"])
    assert row["vips"] == ["10.96.0.2"] and row["ports"] == ["80->8080/http"]
    assert row["endpoints"] == ["prod/pay (10.0.0.2,fd00::2)"]


# -- policy what-if -------------------------------------------------------------------------


def test_whatif_allow_names_the_policy() -> None:
    snap = snapshot_from_dump(mesh_dump())
    dest, port = resolve_destination(snap, "prod/pay:8080")
    result = check(snap, resolve_source(snap, "shop/web"), dest, port)
    assert result["allowed"] and result["policy"] == "prod/allow-web"
    assert {p["policy"]: p["matches"] for p in result["policies"]} == {
        "prod/allow-web": True,
        "prod/deny-batch": False,
    }
    assert check_lines(result)[0] == "ALLOW: shop/web -> prod/pay:8080"


def test_whatif_deny_and_no_match_and_identity_source() -> None:
    snap = snapshot_from_dump(mesh_dump())
    dest, _ = resolve_destination(snap, "pay:8080")
    denied = check(snap, resolve_source(snap, "batch"), dest, 8080)
    assert not denied["allowed"] and denied["policy"] == "prod/deny-batch"
    other_port = check(
        snap, resolve_source(snap, "spiffe://cluster.local/ns/shop/sa/web"), dest, 9090
    )
    assert not other_port["allowed"] and other_port["reason"] == "no ALLOW policy matched"


def test_whatif_plaintext_source_meets_strict_peer_auth() -> None:
    snap = snapshot_from_dump(mesh_dump())
    dest, port = resolve_destination(snap, "10.0.0.2:8080")
    result = check(snap, resolve_source(snap, "192.0.2.7"), dest, port)
    assert not result["allowed"] and "STRICT" in result["reason"]
    assert result["transport"] == "plaintext" and result["policy"] == "prod/strict"


@pytest.mark.parametrize("to", ["nothing:80", "prod/pay", "prod/pay:0", "prod/pay:x"])
def test_whatif_bad_destination(to: str) -> None:
    with pytest.raises(WhatIfError):
        resolve_destination(snapshot_from_dump(mesh_dump()), to)


# -- certificates -----------------------------------------------------------------------------


def _cert(
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: str,
    ca: bool,
    key: ec.EllipticCurvePrivateKey,
) -> str:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(0xABC)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")]
            ),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_chain_info_names_issuer_root_and_times() -> None:
    root_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    root = _cert("root", root_key, "root", True, root_key)
    leaf = _cert("leaf", root_key, "root", False, leaf_key)
    [lf, rt] = chain_info([leaf + root])
    assert lf["issuer"] == "O=root" and lf["uri_sans"] == ["spiffe://cluster.local/ns/a/sa/b"]
    assert rt["ca"] and not lf["ca"] and lf["serial"] == "abc"
    assert lf["not_before"] == "2030-01-01T00:00:00Z"
    assert lf["not_after"] == "2030-01-01T01:00:00Z"


# -- pins, monitor, log levels --------------------------------------------------------------------


def test_pin_dir_problem_says_why(tmp_path: Path) -> None:
    missing = pin_dir_problem(tmp_path / "veil")
    assert missing is not None and "does not exist" in missing
    (tmp_path / "file").write_text("")
    assert "not a directory" in str(pin_dir_problem(tmp_path / "file"))
    # tmp_path is not bpffs: that is the reason given for an existing directory.
    (tmp_path / "veil").mkdir()
    assert "not on a bpffs mount" in str(pin_dir_problem(tmp_path / "veil"))


def test_monitor_lines() -> None:
    drop = {
        "type": "drop",
        "time": "T",
        "pod": "shop/a",
        "reason": "spoofed_source",
        "count": 2,
        "src": None,
        "dst": None,
    }
    assert monitor_line(drop).startswith("T drop  spoofed_source pod=shop/a")
    deny = {
        "type": "deny",
        "time": "T",
        "src": "10.0.0.1:1",
        "dst": "10.0.0.2:80",
        "src_workload": "shop/web",
        "dst_workload": "prod/pay",
        "policy": "prod/p",
        "reason": "denied by DENY policy prod/p",
    }
    assert "policy=prod/p" in monitor_line(deny) and "shop/web" in monitor_line(deny)
    assert RowFilter("prod").event(deny) and not RowFilter("x").event(deny)


def test_drop_deltas_report_growth_only() -> None:
    rows = [{"workload": "shop/a", "veth": "vh1", "ip": "10.0.0.1", "drops": {"no_listener": 3}}]
    events, counts = drop_deltas({}, rows)
    assert [(e["pod"], e["reason"], e["count"]) for e in events] == [("shop/a", "no_listener", 3)]
    assert drop_deltas(counts, rows)[0] == []
    rows[0]["drops"] = {"no_listener": 5, "spoofed_source": 1}
    events, counts = drop_deltas(counts, rows)
    assert {(e["reason"], e["count"]) for e in events} == {
        ("no_listener", 2),
        ("spoofed_source", 1),
    }
    rows[0]["drops"] = {"no_listener": 1}  # row recreated: restart from zero
    assert [e["count"] for e in drop_deltas(counts, rows)[0]] == [1]


def test_log_level_specs() -> None:
    assert parse_level_spec("debug") == [("default", "debug")]
    assert parse_level_spec("proxy=debug, access=off") == [("proxy", "debug"), ("access", "off")]
    for bad in ("", "proxy=loud", "=debug", "a b=info"):
        with pytest.raises(LogLevelError):
            parse_level_spec(bad)
    assert logger_name("proxy", "veil.ztunnel") == "veil.ztunnel.proxy"
    assert logger_name("access", "veil.ztunnel") == "veil.access"
    assert logger_name("veil.agent.status", "veil.ztunnel") == "veil.agent.status"


def test_apply_levels_sets_loggers() -> None:
    import logging

    name = "veil.test_w5_component"
    before = logging.getLogger(name).level
    try:
        assert apply_levels([(name, "error")], "veil.x") == {name: "error"}
        assert logging.getLogger(name).level == logging.ERROR
    finally:
        logging.getLogger(name).setLevel(before)


def test_whatif_keeps_l7_terms_and_waypoint_attachments() -> None:
    """The what-if answers what the ztunnel does: an ALLOW with L7 terms matches
    nothing at L4, and a policy attached to a waypoint does not apply at all."""
    web = "cluster.local/ns/shop/sa/web"
    l7_allow = AuthorizationPolicy(
        "allow-get",
        "prod",
        PolicyAction.ALLOW,
        (
            Rule(
                (Source(principals=(web,)),),
                (Operation(ports=(8080,), methods=("GET",), paths=("/pay",)),),
                (Condition("request.headers[x-user]", ("alice",)),),
            ),
        ),
        selector=Labels({"app": "pay"}),
    )
    attached = AuthorizationPolicy(
        "waypoint-allow",
        "prod",
        PolicyAction.ALLOW,
        (Rule((Source(principals=(web,)),)),),
        target_refs=(TargetRef("Service", "pay"),),
    )
    snap = build_snapshot(
        "node-a",
        [
            Namespace("shop"),
            Namespace("prod"),
            Workload("web", "shop", "web", "node-a", ("10.0.0.1",)),
            Workload("pay", "prod", "pay", "node-a", ("10.0.0.2",), Labels({"app": "pay"})),
            l7_allow,
            attached,
        ],
        epoch="e",
        version=1,
        trust_bundle=None,
    )
    rebuilt = snapshot_from_dump(config_dump(snap))
    assert rebuilt.policies == snap.policies  # nothing the dump carries is lost
    dest, port = resolve_destination(rebuilt, "prod/pay:8080")
    result = check(rebuilt, resolve_source(rebuilt, "shop/web"), dest, port)
    assert not result["allowed"], result
