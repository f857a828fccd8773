"""API keys: issued once and hashed, looked up by name or prefix, changed, revoked, verified (with its cache)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from memserve.errors import InvalidApiKey, InvalidArgument
from memserve.store import ApiKey, KeyStore, Store
from memserve.store.keys import LAST_USED_EVERY_SECONDS, PREFIX_LENGTH
from memserve.store.schema import api_keys

T = TypeVar("T")
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class Clock:
    """Wall time and monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.now = NOW
        self.mono = 1000.0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


def on_store(url: str, work: Callable[[Store, Clock], Awaitable[T]]) -> T:
    clock = Clock()

    async def run() -> T:
        store = await Store.open(url, clock=clock, monotonic=clock.monotonic)
        try:
            return await work(store, clock)
        finally:
            await store.close()

    return asyncio.run(run())


def test_create_returns_the_secret_once_and_stores_only_its_hash(db_url: str, tmp_path: Path) -> None:
    async def work(store: Store, clock: Clock) -> tuple[ApiKey, str, list[Any]]:
        key, secret = await store.keys.create("alice", models=["demo"], rpm=60, tpm=1000, admin=False)
        async with store.engine.connect() as conn:
            rows = [tuple(r) for r in await conn.execute(sa.select(api_keys))]
        return key, secret, rows

    key, secret, rows = on_store(db_url, work)
    assert secret.startswith("ms-") and len(secret) == 46  # 43 base64url characters: 256 random bits
    assert key.prefix == secret[:PREFIX_LENGTH] and len(key.prefix) == 12
    assert (key.name, key.models, key.rpm, key.tpm, key.admin, key.created_at) == (
        "alice",
        ("demo",),
        60,
        1000,
        False,
        NOW,
    )
    assert len(rows) == 1
    assert hashlib.sha256(secret.encode()).hexdigest() in rows[0]
    assert not any(isinstance(v, str) and secret in v for v in rows[0])
    assert secret not in str(key.to_json()) and "hash" not in key.to_json()
    db_file = tmp_path / "data" / "memserve.db"
    if db_file.exists():  # SQLite: the secret is nowhere in the file
        assert secret.encode() not in db_file.read_bytes()


def test_secrets_are_distinct(sqlite_url: str) -> None:
    async def work(store: Store, clock: Clock) -> set[str]:
        return {(await store.keys.create(f"k{i}"))[1] for i in range(20)}

    assert len(on_store(sqlite_url, work)) == 20


def test_a_duplicate_name_is_refused_saying_so(db_url: str) -> None:
    async def work(store: Store, clock: Clock) -> None:
        await store.keys.create("alice")
        await store.keys.create("alice")

    with pytest.raises(InvalidArgument, match="An API key named 'alice' exists already") as caught:
        on_store(db_url, work)
    assert caught.value.param == "name"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"name": ""}, None),
        ({"name": "ms-lookalike"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": "ok", "rpm": 0}, "rpm"),
        ({"name": "ok", "tpm": -5}, "tpm"),
        ({"name": "ok", "daily_tokens": 1.5}, "daily_tokens"),
        ({"name": "ok", "monthly_tokens": True}, "monthly_tokens"),
        ({"name": "ok", "models": "demo"}, "models"),
        ({"name": "ok", "models": []}, "models"),
        ({"name": "ok", "expires_at": datetime(2027, 1, 1)}, "expires_at"),
        ({"name": "ok", "admin": "yes"}, "admin"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(sqlite_url: str, kwargs: dict[str, Any], param: str | None) -> None:
    async def work(store: Store, clock: Clock) -> None:
        await store.keys.create(**kwargs)

    with pytest.raises(InvalidArgument) as caught:
        on_store(sqlite_url, work)
    assert caught.value.param == param


def test_get_by_name_or_prefix_and_list_in_creation_order(db_url: str) -> None:
    async def work(store: Store, clock: Clock) -> tuple[ApiKey, ApiKey, ApiKey, list[str]]:
        alice, _ = await store.keys.create("alice")
        clock.advance(1)
        await store.keys.create("bob", models=["*"])
        return (
            alice,
            await store.keys.get("alice"),
            await store.keys.get(alice.prefix),
            [k.name for k in await store.keys.list()],
        )

    alice, by_name, by_prefix, names = on_store(db_url, work)
    assert alice == by_name == by_prefix
    assert names == ["alice", "bob"]


def test_a_missing_key_is_an_invalid_argument_on_key_that_never_echoes_a_secret(sqlite_url: str) -> None:
    def lookup(name: str) -> Callable[[Store, Clock], Awaitable[ApiKey]]:
        async def work(store: Store, clock: Clock) -> ApiKey:
            return await store.keys.get(name)

        return work

    with pytest.raises(InvalidArgument, match="No API key is named or prefixed 'carol'") as caught:
        on_store(sqlite_url, (lookup("carol")))
    assert caught.value.param == "key" and caught.value.status_code == 404  # as a file or batch not there
    secret = "ms-" + "A" * 43
    with pytest.raises(InvalidArgument, match="never the secret") as caught:
        on_store(sqlite_url, (lookup(secret)))
    assert secret not in caught.value.message


def test_models_none_or_star_allow_every_model_else_only_those_listed(sqlite_url: str) -> None:
    async def work(store: Store, clock: Clock) -> list[ApiKey]:
        return [
            (await store.keys.create("all"))[0],
            (await store.keys.create("star", models=["*"]))[0],
            (await store.keys.create("two", models=["a", "b", "a"]))[0],
        ]

    every, star, two = on_store(sqlite_url, work)
    assert every.models is None and star.models is None and two.models == ("a", "b")
    assert every.allows("anything") and star.allows("anything")
    assert two.allows("a") and two.allows("b") and not two.allows("c")


def test_verify_accepts_an_issued_key_and_refuses_each_bad_one_with_its_own_message(db_url: str) -> None:
    async def work(store: Store, clock: Clock) -> dict[str, str]:
        good, good_secret = await store.keys.create("good")
        _, revoked_secret = await store.keys.create("revoked")
        await store.keys.revoke("revoked")
        _, expiring_secret = await store.keys.create("expiring", expires_at=NOW + timedelta(hours=1))
        assert (await store.keys.verify(good_secret)).id == good.id
        assert (await store.keys.verify(expiring_secret)).name == "expiring"
        clock.advance(3600)
        messages = {}
        unknown = "ms-" + "Z" * 43
        cases = {
            "malformed-prefix": "sk-" + "a" * 43,
            "malformed-short": "ms-abc",
            "malformed-chars": "ms-" + "a" * 42 + "!",
            "empty": "",
            "unknown": unknown,
            "revoked": revoked_secret,
            "expired": expiring_secret,
        }
        for case, secret in cases.items():
            with pytest.raises(InvalidApiKey) as caught:
                await store.keys.verify(secret)
            assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
            assert not secret or secret not in caught.value.message
            messages[case] = caught.value.message
        return messages

    messages = on_store(db_url, work)
    assert all("malformed" in messages[c] for c in ("malformed-prefix", "malformed-short", "malformed-chars", "empty"))
    assert "not one this server issued" in messages["unknown"]
    assert "was revoked at" in messages["revoked"]
    assert "expired at 2026-06-01T13:00:00+00:00" in messages["expired"]
    assert len({messages["unknown"], messages["revoked"], messages["expired"], messages["empty"]}) == 4


def test_active_says_why_a_key_cannot_be_used() -> None:
    key = ApiKey(
        id="i",
        name="n",
        prefix="ms-123456789",
        models=None,
        rpm=None,
        tpm=None,
        daily_tokens=None,
        monthly_tokens=None,
        admin=False,
        created_at=NOW,
        expires_at=NOW + timedelta(days=1),
        revoked_at=None,
        last_used_at=None,
    )
    assert key.active(NOW) is None
    assert key.active(NOW + timedelta(days=1)) == "expired"
    assert key.active(NOW + timedelta(days=2)) == "expired"
    revoked = ApiKey(**{**key.__dict__, "revoked_at": NOW})
    assert revoked.active(NOW) == "revoked"


def test_revoke_here_refuses_at_once_and_elsewhere_within_the_cache_time(db_url: str) -> None:
    async def work(store: Store, clock: Clock) -> None:
        other = KeyStore(store.engine, store.target, clock=clock, monotonic=clock.monotonic, cache_seconds=5.0)
        _, secret = await store.keys.create("alice")
        assert (await store.keys.verify(secret)).name == "alice"
        assert (await other.verify(secret)).name == "alice"
        revoked = await store.keys.revoke("alice")
        assert revoked.revoked_at == NOW
        assert (await store.keys.revoke(revoked.prefix)).revoked_at == NOW  # again: unchanged
        with pytest.raises(InvalidApiKey, match="revoked"):
            await store.keys.verify(secret)  # this gateway: at once
        clock.advance(4.9)
        assert (await other.verify(secret)).name == "alice"  # the other gateway: still cached
        clock.advance(0.2)
        with pytest.raises(InvalidApiKey, match="revoked"):
            await other.verify(secret)  # within cache_seconds

    on_store(db_url, work)


def test_verify_reads_the_database_once_per_cache_period(sqlite_url: str) -> None:
    async def work(store: Store, clock: Clock) -> list[int]:
        _, secret = await store.keys.create("alice")
        statements: list[str] = []
        sa.event.listen(store.engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        counts = []
        for _ in range(3):
            await store.keys.verify(secret)
            counts.append(sum("FROM api_keys" in s for s in statements))
        clock.advance(5.0)
        await store.keys.verify(secret)
        counts.append(sum("FROM api_keys" in s for s in statements))
        return counts

    assert on_store(sqlite_url, work) == [1, 1, 1, 2]


def test_update_sets_what_is_passed_clears_none_and_leaves_the_rest(db_url: str) -> None:
    async def work(store: Store, clock: Clock) -> list[ApiKey]:
        await store.keys.create("alice", models=["a"], rpm=10, tpm=100, daily_tokens=1000, monthly_tokens=9000)
        first = await store.keys.update("alice", rpm=20, tpm=None)
        second = await store.keys.update("alice", models=["*"], expires_at=NOW + timedelta(days=30), admin=True)
        third = await store.keys.update("alice")
        return [first, second, third]

    first, second, third = on_store(db_url, work)
    assert (first.models, first.rpm, first.tpm, first.daily_tokens, first.monthly_tokens) == (
        ("a",),
        20,
        None,
        1000,
        9000,
    )
    assert (second.models, second.rpm, second.expires_at, second.admin) == (None, 20, NOW + timedelta(days=30), True)
    assert third == second


def test_update_refuses_unknown_fields_and_revoked_keys(sqlite_url: str) -> None:
    async def work(store: Store, clock: Clock) -> None:
        await store.keys.create("alice")
        with pytest.raises(InvalidArgument, match="Cannot change name") as caught:
            await store.keys.update("alice", name="bob")
        assert caught.value.param == "name"
        with pytest.raises(InvalidArgument) as caught:
            await store.keys.update("alice", rpm=0)
        assert caught.value.param == "rpm"
        await store.keys.revoke("alice")
        with pytest.raises(InvalidArgument, match="revoked"):
            await store.keys.update("alice", rpm=5)

    on_store(sqlite_url, work)


def test_an_update_elsewhere_is_seen_within_the_cache_time_and_here_at_once(sqlite_url: str) -> None:
    async def work(store: Store, clock: Clock) -> list[int | None]:
        other = KeyStore(store.engine, store.target, clock=clock, monotonic=clock.monotonic)
        _, secret = await store.keys.create("alice", rpm=1)
        seen = [(await store.keys.verify(secret)).rpm, (await other.verify(secret)).rpm]
        await store.keys.update("alice", rpm=2)
        seen += [(await store.keys.verify(secret)).rpm, (await other.verify(secret)).rpm]
        clock.advance(5)
        seen.append((await other.verify(secret)).rpm)
        return seen

    assert on_store(sqlite_url, work) == [1, 1, 2, 1, 2]


def test_last_used_at_is_written_by_the_flush_at_most_once_a_minute(db_url: str) -> None:
    async def work(store: Store, clock: Clock) -> list[datetime | None]:
        _, secret = await store.keys.create("alice")
        seen = [(await store.keys.get("alice")).last_used_at]
        await store.keys.verify(secret)
        seen.append((await store.keys.get("alice")).last_used_at)  # not on the request path
        await store.usage.flush()
        seen.append((await store.keys.get("alice")).last_used_at)
        clock.advance(LAST_USED_EVERY_SECONDS - 1)
        await store.keys.verify(secret)
        await store.usage.flush()
        seen.append((await store.keys.get("alice")).last_used_at)
        clock.advance(1)
        await store.keys.verify(secret)
        await store.usage.flush()
        seen.append((await store.keys.get("alice")).last_used_at)
        return seen

    first_use = NOW
    assert on_store(db_url, work) == [None, None, first_use, first_use, first_use + timedelta(seconds=60)]
