"""SPIFFE ID rules (controller.api.spiffe): table-driven plus Hypothesis on arbitrary input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api.spiffe import (
    MAX_SPIFFE_ID_LENGTH,
    InvalidSpiffeId,
    SpiffeId,
    node_identity,
    validate_trust_domain,
    workload_identity,
)

VALID = [
    ("spiffe://cluster.local/ns/default/sa/web", "cluster.local", "/ns/default/sa/web"),
    ("spiffe://cluster.local", "cluster.local", ""),
    ("spiffe://example.org/veil/node/node-1", "example.org", "/veil/node/node-1"),
    ("spiffe://td_1-x.y/a/B.c/D_e-f", "td_1-x.y", "/a/B.c/D_e-f"),
]

INVALID = [
    ("", "empty"),
    ("http://cluster.local/ns/a/sa/b", "scheme"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "scheme uppercase"),
    ("spiffe://", "no trust domain"),
    ("spiffe:///ns/a/sa/b", "empty trust domain"),
    ("spiffe://Cluster.local/ns/a/sa/b", "uppercase trust domain"),
    ("spiffe://cluster.local:8443/ns/a/sa/b", "port"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "user info"),
    ("spiffe://cluster.local/ns/a/sa/b/", "trailing slash"),
    ("spiffe://cluster.local/ns//sa/b", "empty segment"),
    ("spiffe://cluster.local/ns/./sa/b", "dot segment"),
    ("spiffe://cluster.local/ns/../sa/b", "dot-dot segment"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
    ("spiffe://cluster.local/ns/a b/sa/b", "space"),
    ("spiffe://cluster.local/ns/a%20b/sa/b", "percent encoding"),
    ("spiffe://cluster.local/ns/ä/sa/b", "non-ascii"),
    ("spiffe://clu ster.local/ns/a", "space in trust domain"),
    ("spiffe://cluster.local/" + "a" * MAX_SPIFFE_ID_LENGTH, "too long"),
]


@pytest.mark.parametrize(("uri", "td", "path"), VALID)
def test_valid_ids_parse_and_round_trip(uri: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(uri)
    assert (sid.trust_domain, sid.path) == (td, path)
    assert str(sid) == uri


@pytest.mark.parametrize(("uri", "why"), INVALID)
def test_invalid_ids_are_refused_with_a_message(uri: str, why: str) -> None:
    with pytest.raises(InvalidSpiffeId) as e:
        SpiffeId.parse(uri)
    assert e.value.message, why


@pytest.mark.parametrize(
    ("uri", "workload", "node"),
    [
        ("spiffe://td/ns/a/sa/b", ("a", "b"), None),
        ("spiffe://td/veil/node/n1", None, "n1"),
        ("spiffe://td/ns/a/sa/b/extra", None, None),
        ("spiffe://td/ns/a", None, None),
        ("spiffe://td/sa/b/ns/a", None, None),
        ("spiffe://td/veil/node", None, None),
        ("spiffe://td", None, None),
    ],
)
def test_workload_and_node_forms(
    uri: str, workload: tuple[str, str] | None, node: str | None
) -> None:
    sid = SpiffeId.parse(uri)
    assert sid.workload == workload
    assert sid.node == node


def test_node_identity_can_never_be_a_workload_identity() -> None:
    sid = node_identity("cluster.local", "ns")
    assert str(sid) == "spiffe://cluster.local/veil/node/ns"
    assert sid.workload is None and sid.node == "ns"


@pytest.mark.parametrize(
    ("ns", "sa", "ok"),
    [
        ("default", "web", True),
        ("kube-system", "a.b", True),
        ("Default", "web", False),
        ("-bad", "web", False),
        ("ok", "bad-", False),
        ("ok", "", False),
        ("a/b", "web", False),
    ],
)
def test_workload_identity_validates_kubernetes_names(ns: str, sa: str, ok: bool) -> None:
    if ok:
        assert (
            str(workload_identity("cluster.local", ns, sa))
            == f"spiffe://cluster.local/ns/{ns}/sa/{sa}"
        )
    else:
        with pytest.raises(InvalidSpiffeId):
            workload_identity("cluster.local", ns, sa)


@pytest.mark.parametrize("td", ["", "UPPER", "a/b", "a b", "x" * 256])
def test_invalid_trust_domains(td: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        validate_trust_domain(td)


@given(st.text(max_size=300))
def test_arbitrary_text_parses_or_raises_invalid_spiffe_id(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    # Whatever parses is canonical: printing it gives back the input.
    assert str(sid) == text


_SEG = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789._-", min_size=1, max_size=20
).filter(lambda s: s not in (".", ".."))


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=30),
    st.lists(_SEG, max_size=6),
)
def test_generated_valid_ids_round_trip(td: str, segments: list[str]) -> None:
    uri = "spiffe://" + td + "".join("/" + s for s in segments)
    assert str(SpiffeId.parse(uri)) == uri
