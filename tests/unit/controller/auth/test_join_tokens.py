"""Join tokens: format, single use, expiry, node binding, hashing at rest."""

from __future__ import annotations

import contextlib
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api.errors import ApiError
from controller.auth import JoinToken, JoinTokenStore
from controller.errors import TokenError

FP = "ab" * 32


def test_format_round_trips_and_hides_the_secret() -> None:
    t = JoinToken.generate(FP)
    text = str(t)
    assert text.startswith("veil1.") and text.endswith("." + FP) and len(text.split(".")) == 4
    assert JoinToken.parse(text) == t
    assert t.secret not in repr(t)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "veil1",
        "veil2.0123456789ab." + "A" * 32 + "." + FP,
        "veil1.0123456789AB." + "A" * 32 + "." + FP,  # id must be lowercase hex
        "veil1.0123456789ab." + "A" * 31 + "." + FP,
        "veil1.0123456789ab." + "A" * 32 + "." + FP[:-1],
        "veil1.0123456789ab." + "A" * 32 + "." + FP + ".x",
        "veil1.0123456789ab." + "A+" * 16 + "." + FP,
    ],
)
def test_malformed_tokens_are_refused(text: str) -> None:
    with pytest.raises(TokenError, match="malformed"):
        JoinToken.parse(text)


@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_token_error(text: str) -> None:
    with contextlib.suppress(TokenError):
        JoinToken.parse(text)


@pytest.fixture
def store(tmp_path: Path, clock: Any) -> JoinTokenStore:
    return JoinTokenStore(tmp_path, ca_fingerprint=lambda: FP, clock=clock)


async def test_a_token_works_once_for_its_node(store: JoinTokenStore) -> None:
    token = store.create("node-1", timedelta(hours=1))
    assert await store.authenticate(token, "node-1") == "node-1"
    with pytest.raises(ApiError) as e:
        await store.authenticate(token, "node-1")
    assert e.value.code == "UNAUTHENTICATED" and "already used" in e.value.message


async def test_expired_token(store: JoinTokenStore, clock: Any) -> None:
    token = store.create("node-1", timedelta(minutes=5))
    clock.advance(timedelta(minutes=5))
    with pytest.raises(ApiError) as e:
        await store.authenticate(token, "node-1")
    assert e.value.code == "UNAUTHENTICATED" and "expired" in e.value.message


async def test_token_for_another_node_is_refused_and_not_spent(store: JoinTokenStore) -> None:
    token = store.create("node-1", timedelta(hours=1))
    with pytest.raises(ApiError) as e:
        await store.authenticate(token, "node-2")
    assert e.value.code == "UNAUTHENTICATED" and "issued for node 'node-1'" in e.value.message
    assert await store.authenticate(token, "node-1") == "node-1"


def _tamper(token: str, field: int) -> str:
    parts = token.split(".")
    s = parts[field]
    parts[field] = ("b" if s[0] == "a" else "a") + s[1:]
    return ".".join(parts)


@pytest.mark.parametrize(
    ("field", "needle"), [(1, "not recognised"), (2, "invalid secret"), (3, "CA fingerprint")]
)
async def test_tampered_tokens_are_refused(store: JoinTokenStore, field: int, needle: str) -> None:
    token = store.create("node-1", timedelta(hours=1))
    with pytest.raises(ApiError) as e:
        await store.authenticate(_tamper(token, field), "node-1")
    assert e.value.code == "UNAUTHENTICATED" and needle in e.value.message
    # The genuine token was not spent by the forgery.
    assert await store.authenticate(token, "node-1") == "node-1"


async def test_garbage_is_unauthenticated(store: JoinTokenStore) -> None:
    with pytest.raises(ApiError) as e:
        await store.authenticate("hello", "node-1")
    assert e.value.code == "UNAUTHENTICATED"


def test_only_a_hash_of_the_secret_is_stored_0600(store: JoinTokenStore) -> None:
    token = JoinToken.parse(store.create("node-1", timedelta(hours=1)))
    data = store.path.read_text()
    assert token.secret not in data and token.secret_hash in data
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


async def test_list_and_revoke(store: JoinTokenStore, clock: Any) -> None:
    a = store.create("node-a", timedelta(hours=1))
    store.create("node-b", timedelta(hours=1))
    await store.authenticate(a, "node-a")
    states = {t.node: t.state(clock()) for t in store.list()}
    assert states == {"node-a": "used", "node-b": "valid"}
    b_id = next(t.token_id for t in store.list() if t.node == "node-b")
    assert store.revoke(b_id) and not store.revoke(b_id)
    assert [t.node for t in store.list()] == ["node-a"]


async def test_spent_tokens_are_forgotten_after_a_day(store: JoinTokenStore, clock: Any) -> None:
    store.create("node-a", timedelta(minutes=1))
    clock.advance(timedelta(days=2))
    store.create("node-b", timedelta(minutes=1))
    assert [t.node for t in store.list()] == ["node-b"]


@pytest.mark.parametrize(
    ("node", "ttl", "needle"),
    [
        ("Node_1", timedelta(hours=1), "invalid node name"),
        ("node-1", timedelta(0), "out of range"),
        ("node-1", timedelta(days=31), "out of range"),
    ],
)
def test_create_validates_input(
    store: JoinTokenStore, node: str, ttl: timedelta, needle: str
) -> None:
    with pytest.raises(TokenError, match=needle):
        store.create(node, ttl)


def test_two_stores_on_one_directory_share_single_use(tmp_path: Path) -> None:
    cli = JoinTokenStore(tmp_path)
    controller = JoinTokenStore(tmp_path)
    token = cli.create("node-1", timedelta(hours=1), ca_fingerprint=FP)
    assert controller.verify_and_consume(token, "node-1") == "node-1"
    with pytest.raises(ApiError, match="already used"):
        cli.verify_and_consume(token, "node-1")
