"""Several gateways on one Postgres: the user's case, two real ``memserve serve`` processes and nothing in front.

Both gateways run with ``auth: keys``, the same ``database_url`` (a fresh database on the throwaway server of
``tests/postgres.py``, so they also migrate it together at start), one bootstrap ``MEMSERVE_ADMIN_KEY`` and the
default flush interval and key cache; the model is a remote provider faked on 127.0.0.1 (no runner, no
torch). Everything is checked through the HTTP API, as clients and admins call it. What these tests wait for
(another gateway's flush, its key cache) they poll for, bounded generously; they assert counts, never times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.test_keys import ADMIN, CHAT, admin, new_key
from tests.postgres import PostgresServer
from tests.postgres import postgres_server as postgres_server  # the session's throwaway server
from tests.serving import FakeOpenAI, free_port, serve_fake, wait_until_healthy

# Far above what any wait here needs on an idle machine (a flush: 1 s; a key cache: 5 s; a fetch: 2 s), so
# that a busy 2-core CI machine does not fail them; a wait that runs out is a failure with what was seen.
PATIENCE_SECONDS = 120.0


@dataclass
class Gateway:
    name: str
    origin: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def gateways(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Gateway]]:
    """Gateways A and B, started at the same time on one fresh database, each with its own data folder."""
    folder = tmp_path_factory.mktemp("shared-store")
    url = postgres_server.new_database()
    with serve_fake(FakeOpenAI(models=("m1",))) as fake:
        started: list[Gateway] = []
        try:
            for name in ("a", "b"):
                started.append(_start(name, folder, url, fake.base_url))
            for gateway in started:
                wait_until_healthy(gateway.origin, gateway.process, log=gateway.log)
            yield started
        finally:
            for gateway in started:
                _stop(gateway)


def _start(name: str, folder: Path, database_url: str, provider_url: str) -> Gateway:
    port = free_port()
    env = {
        **os.environ,
        "MEMSERVE_DATA_DIR": str(folder / name),
        "MEMSERVE_AUTH": "keys",
        "MEMSERVE_DATABASE_URL": database_url,
        "MEMSERVE_ADMIN_KEY": ADMIN,
        "MEMSERVE_PROVIDERS": json.dumps([{"name": "fake", "base_url": provider_url, "models": ["m1"]}]),
    }
    log = folder / f"{name}.log"
    command = [sys.executable, "-m", "memserve", "serve", "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=out)
    return Gateway(name, f"http://127.0.0.1:{port}", process, log)


def _stop(gateway: Gateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.send_signal(signal.SIGTERM)
        try:
            gateway.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            gateway.process.kill()
            gateway.process.wait()


def poll(what: str, check: Callable[[], Any]) -> Any:
    """``check()`` until it returns something true (then that), for at most PATIENCE_SECONDS."""
    deadline = time.monotonic() + PATIENCE_SECONDS
    while True:
        seen = check()
        if seen:
            return seen
        assert time.monotonic() < deadline, f"waited {PATIENCE_SECONDS:g} s for {what}; last seen: {seen!r}"
        time.sleep(0.1)


def ask(gateway: Gateway, secret: str, **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"}
    return httpx.post(f"{gateway.origin}/v1/chat/completions", json={**CHAT, **extra}, headers=headers, timeout=60)


def usage_by_user(gateway: Gateway) -> dict[str, int]:
    with admin(gateway.origin) as client:
        answer = client.get("/api/usage", params={"group_by": "user"})
    assert answer.status_code == 200, answer.text
    return {row["end_user"]: row["requests"] for row in answer.json()["rows"] if row["end_user"]}


def test_a_key_created_on_one_gateway_works_on_the_other(gateways: list[Gateway]) -> None:
    a, b = gateways
    secret = new_key(a.origin, "made-on-a", models=["fake/m1"])
    client = openai.OpenAI(base_url=f"{b.origin}/v1", api_key=secret, max_retries=0)
    answer = client.chat.completions.create(**CHAT)
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert [m.id for m in client.models.list()] == ["fake/m1"]
    with admin(b.origin) as on_b:
        listed = on_b.get("/api/keys").json()
    assert "made-on-a" in json.dumps(listed)


def test_usage_from_both_gateways_is_in_the_report_of_either(gateways: list[Gateway]) -> None:
    a, b = gateways
    secret = new_key(b.origin, "used-on-both")
    for gateway, user, count in ((a, "user-on-a", 3), (b, "user-on-b", 2)):
        for _ in range(count):
            assert ask(gateway, secret, user=user).status_code == 200
    expected = {"user-on-a": 3, "user-on-b": 2}
    for gateway in gateways:  # each writes its own rows when asked; the other's arrive with its flush
        poll(
            f"gateway {gateway.name}'s /api/usage to show both gateways' requests",
            lambda gateway=gateway: (
                (seen := usage_by_user(gateway)) and all(seen.get(user) == n for user, n in expected.items())
            ),
        )


def test_a_key_revoked_on_one_gateway_is_refused_on_the_other_once_its_cache_expires(
    gateways: list[Gateway],
) -> None:
    a, b = gateways
    secret = new_key(a.origin, "revoked-on-a")
    assert ask(b, secret).status_code == 200  # B has the key in its cache now
    with admin(a.origin) as on_a:
        assert on_a.delete("/api/keys/revoked-on-a").status_code == 200
    assert ask(a, secret).status_code == 401  # at once where it was revoked
    refused = poll("gateway b to refuse the revoked key", lambda: (r := ask(b, secret)).status_code == 401 and r)
    assert refused.json()["error"]["code"] == "invalid_api_key" and "revoked" in refused.json()["error"]["message"]


def test_a_limit_spent_on_one_gateway_is_refused_on_the_other_once_the_rows_are_written(
    gateways: list[Gateway],
) -> None:
    """The usage log is the shared counter: B counts what A admitted once A's rows are in the database (B's
    first request for a key asks the log at once)."""
    a, b = gateways
    rpm = 4
    secret = new_key(a.origin, "spent-on-a", rpm=rpm)
    assert [ask(a, secret).status_code for _ in range(rpm + 1)] == [200] * rpm + [429]
    poll(  # the refused request has its row too (an error that spends nothing)
        "A's rows to be in the database, as B's /api/usage reads it",
        lambda: any(
            (r["key_name"], r["requests"], r["errors"]) == ("spent-on-a", rpm + 1, 1) for r in _usage_by_key(b)
        ),
    )
    refused = ask(b, secret)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert f"limit of {rpm:,} requests per minute ({rpm:,} in the last minute)" in error["message"]


def _usage_by_key(gateway: Gateway) -> list[dict[str, Any]]:
    with admin(gateway.origin) as client:
        answer = client.get("/api/usage", params={"group_by": "key"})
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()["rows"]
    return rows


def test_an_rpm_limit_holds_across_both_gateways_within_the_stated_bound(gateways: list[Gateway]) -> None:
    """docs/limits.md: N gateways admit at most N × the limit in a minute, and at least the limit itself
    (every request under the limit passes whichever gateway it reaches)."""
    rpm = 6
    secret = new_key(gateways[0].origin, "rpm-across", rpm=rpm)
    statuses: list[int] = []
    first = time.monotonic()
    # four times the limit, alternately to A and B; none sent past 50 s, so all fall in one minute's window
    for i in range(4 * rpm):
        if time.monotonic() - first > 50:
            break
        answer = ask(gateways[i % 2], secret)
        statuses.append(answer.status_code)
        if answer.status_code == 429:
            error = answer.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and f"{rpm:,} requests per minute" in error["message"]
            assert int(answer.headers["retry-after"]) >= 1
    assert set(statuses) <= {200, 429}
    admitted = statuses.count(200)
    assert statuses[: min(rpm, len(statuses))] == [200] * min(rpm, len(statuses))
    assert min(rpm, len(statuses)) <= admitted <= 2 * rpm, statuses
