"""Keys, auth on every route, usage metered per request, and limits, through the gateway as clients call it.

The upstream is the fake OpenAI server on 127.0.0.1 as a provider (the local runner's path is metered by the
same code, and covered by ``test_a_local_models_usage_is_what_its_client_got``); the store is SQLite in the
test's folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from memserve.config import ProviderConfig, Settings
from memserve.errors import InvalidArgument
from memserve.gateway.app import create_app
from memserve.gateway.auth import PUBLIC_PATHS, auth_mode
from memserve.pool.pool import ModelPool
from memserve.store.db import Store, database_url
from memserve.wire.fake import FakeOpenAI, Script
from tests.gateway.test_gateway_process import GiB, gateway, host, local, settings_for
from tests.serving import free_port, serve_app, serve_fake, wait_until_healthy

ADMIN = "ms-admin-bootstrap-secret-for-tests"
CHAT: dict[str, Any] = {
    "model": "fake/m1",
    "messages": [{"role": "user", "content": "tell me a story"}],
    "max_tokens": 5,
}
STREAMED: dict[str, Any] = {**CHAT, "stream": True}


def keyed_settings(tmp_path: Path, base_url: str, **extra: Any) -> Settings:
    return settings_for(
        tmp_path,
        [],
        auth="keys",
        usage_flush_seconds=60,  # rows reach the store by an explicit flush or the shutdown's
        providers=[ProviderConfig(name="fake", base_url=base_url, models=["m1", "m2"])],
        **extra,
    )


@contextmanager
def keyed_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> Iterator[tuple[str, FakeOpenAI]]:
    monkeypatch.setenv("MEMSERVE_ADMIN_KEY", ADMIN)
    with serve_fake(FakeOpenAI(models=("m1", "m2"))) as fake:
        settings = keyed_settings(tmp_path, fake.base_url, **extra)
        with serve_app(create_app(settings, ModelPool(settings, host(4 * GiB))), lifespan=True) as origin:
            yield origin, fake


def admin(origin: str) -> httpx.Client:
    return httpx.Client(base_url=origin, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)


def new_key(origin: str, name: str, **fields: Any) -> str:
    with admin(origin) as client:
        answer = client.post("/api/keys", json={"name": name, **fields})
    assert answer.status_code == 200, answer.text
    secret: str = answer.json()["secret"]
    assert secret.startswith("ms-") and len(secret) >= 40 and secret not in json.dumps(answer.json()["key"])
    return secret


def usage_rows(tmp_path: Path) -> list[dict[str, Any]]:
    """Every usage row in the test's store (after the gateway flushed them)."""

    async def read() -> list[dict[str, Any]]:
        import sqlalchemy as sa

        store = await Store.open(database_url(None, tmp_path / "data"))
        try:
            async with store.engine.connect() as conn:
                result = await conn.execute(sa.text("SELECT * FROM usage ORDER BY id"))
                return [dict(row._mapping) for row in result]
        finally:
            await store.close()

    return asyncio.run(read())


def test_every_route_but_health_refuses_a_request_without_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSERVE_ADMIN_KEY", ADMIN)
    settings = keyed_settings(tmp_path, "http://127.0.0.1:9/v1")
    app = create_app(settings, ModelPool(settings, host(4 * GiB)))
    fastapi_app = app.app  # type: ignore[attr-defined]  # FastAPI behind the hot routes
    routes = [
        (method, route.path.replace("{name}", "somebody"))
        for route in fastapi_app.routes
        for method in sorted(getattr(route, "methods", None) or {"GET"})
        if method != "HEAD"
    ]
    assert any(isinstance(r, APIRoute) and r.path == "/api/keys" for r in fastapi_app.routes)
    with TestClient(app) as client:
        for method, path in routes:
            answer = client.request(method, path)
            if path in PUBLIC_PATHS:  # /health, and the /ui page's files (they hold no data)
                assert answer.status_code == 200
                continue
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "invalid_api_key"
            bad = client.request(method, path, headers={"Authorization": "Bearer ms-not-a-key-anybody-issued"})
            assert bad.status_code == 401, (method, path)
        user = client.post("/api/keys", json={"name": "user"}, headers={"x-api-key": ADMIN}).json()["secret"]
        for method, path in routes:
            if path.startswith("/v1/") or path in PUBLIC_PATHS:
                continue
            answer = client.request(method, path, headers={"Authorization": f"Bearer {user}"})
            assert answer.status_code == 403, (method, path, answer.text)  # a key, but not an admin one
            assert "admin key" in answer.json()["error"]["message"]


def test_the_openai_client_works_with_a_key_and_fails_cleanly_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with keyed_gateway(tmp_path, monkeypatch) as (origin, fake):
        secret = new_key(origin, "app", models=["fake/m1"])
        client = openai.OpenAI(base_url=f"{origin}/v1", api_key=secret, max_retries=0)
        answer = client.chat.completions.create(**CHAT)
        assert answer.usage is not None and answer.usage.completion_tokens == 5
        assert [m.id for m in client.models.list()] == ["fake/m1"]  # only what the key may use
        assert client.models.retrieve("fake/m1").id == "fake/m1"  # OpenAI's retrieve: GET /v1/models/{model}
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.models.retrieve("fake/m2")  # hidden as the list hides it
        with pytest.raises(openai.PermissionDeniedError, match="may not use model 'fake/m2'"):
            client.chat.completions.create(**{**CHAT, "model": "fake/m2"})
        with pytest.raises(openai.AuthenticationError, match=r"invalid_api_key|API key"):
            openai.OpenAI(base_url=f"{origin}/v1", api_key="ms-wrong", max_retries=0).chat.completions.create(**CHAT)
        with admin(origin) as a:
            assert a.delete("/api/keys/app").status_code == 200
        with pytest.raises(openai.AuthenticationError, match="revoked"):
            client.chat.completions.create(**CHAT)
        assert fake.requests and all(r.authorization is None for r in fake.requests)  # our keys never go upstream


def test_usage_rows_match_what_each_client_received(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with keyed_gateway(tmp_path, monkeypatch) as (origin, fake):
        secret = new_key(origin, "app")
        client = openai.OpenAI(base_url=f"{origin}/v1", api_key=secret, max_retries=0)
        whole = client.chat.completions.create(**CHAT, user="alice")
        streamed = list(client.chat.completions.create(**STREAMED, extra_headers={"x-memserve-user": "bob"}))
        asked = list(client.chat.completions.create(**STREAMED, stream_options={"include_usage": True}))
        fake.script = Script(token_gaps_seconds=(0.05,))  # 200 tokens take 10 s: the client leaves long before
        with httpx.Client(base_url=origin, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as raw:
            with raw.stream("POST", "/v1/chat/completions", json={**STREAMED, "max_tokens": 200}) as cut:
                got = 0
                for line in cut.iter_lines():
                    if '"content":' in line:
                        got += 1
                    if got == 3:
                        break
            missing = raw.post("/v1/chat/completions", json={**CHAT, "model": "fake/nope"})
        assert missing.status_code == 404
    rows = usage_rows(tmp_path)  # the gateway has shut down: its last rows were flushed then
    assert [r["end_user"] for r in rows[:2]] == ["alice", "bob"]
    assert whole.usage is not None
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    assert all(c.usage is None for c in streamed)  # the usage chunk it did not ask for was not sent to it
    contents = sum(1 for c in streamed if c.choices and c.choices[0].delta.content)
    assert rows[1]["completion_tokens"] == contents == 5 and rows[1]["prompt_tokens"] == whole.usage.prompt_tokens
    assert rows[1]["ttft_seconds"] is not None and rows[1]["status"] == 200
    usage_chunk = asked[-1].usage
    assert usage_chunk is not None and rows[2]["completion_tokens"] == usage_chunk.completion_tokens == 5
    assert rows[3]["status"] == 499 and rows[3]["error_type"] == "client_closed"
    assert 3 <= rows[3]["completion_tokens"] < 200  # what reached the client before it left, not what was asked
    assert (rows[4]["status"], rows[4]["error_type"], rows[4]["model"]) == (404, "model_not_found", "fake/nope")
    assert {r["key_name"] for r in rows} == {"app"} and all(r["provider"] == "fake" for r in rows)


def test_a_key_past_its_rate_limit_gets_429_and_the_next_minute_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with keyed_gateway(tmp_path, monkeypatch) as (origin, _fake):
        secret = new_key(origin, "script", rpm=2)
        with httpx.Client(base_url=origin, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as client:
            statuses = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(3)]
            refused = client.post("/v1/chat/completions", json=CHAT)
        assert statuses == [200, 200, 429] and refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 0 < float(refused.headers["retry-after"]) <= 60
        assert "2 requests per minute" in refused.json()["error"]["message"]


def test_auth_is_off_only_on_loopback() -> None:
    assert auth_mode(None, "127.0.0.1") == "off" and auth_mode(None, "::1") == "off"
    assert auth_mode(None, "0.0.0.0") == "keys" and auth_mode("keys", "127.0.0.1") == "keys"
    assert auth_mode("off", "0.0.0.0", insecure=True) == "off"
    with pytest.raises(InvalidArgument, match="--insecure"):
        auth_mode("off", "0.0.0.0")


def test_keys_created_with_the_cli_open_the_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from memserve.cli import main

    monkeypatch.setenv("MEMSERVE_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "ci", "--models", "fake/m1", "--rpm", "100", "--expires", "30d"])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert secret.startswith("ms-") and "shown once" in created.stderr
    listed = runner.invoke(main, ["keys", "list", "--json"])
    assert listed.exit_code == 0 and secret not in listed.output
    [row] = json.loads(listed.stdout)
    assert (row["name"], row["models"], row["rpm"]) == ("ci", ["fake/m1"], 100) and row["expires_at"]
    assert runner.invoke(main, ["keys", "update", "ci", "--rpm", "none"]).exit_code == 0
    assert json.loads(runner.invoke(main, ["keys", "show", "ci"]).stdout)["rpm"] is None
    with keyed_gateway(tmp_path, monkeypatch) as (origin, _fake), httpx.Client(base_url=origin, timeout=30) as client:
        ok = client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": secret})
        assert ok.status_code == 200, ok.text
    assert runner.invoke(main, ["keys", "revoke", "ci"]).exit_code == 0
    summary = runner.invoke(main, ["usage", "--by", "key", "--json"])
    assert summary.exit_code == 0, summary.output
    [by_key] = json.loads(summary.stdout)
    assert by_key["requests"] == 1 and by_key["completion_tokens"] == 5
    duplicate = runner.invoke(main, ["keys", "create", "ci"])
    assert duplicate.exit_code != 0 and "ci" in duplicate.output


def test_a_local_models_usage_is_what_its_client_got(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Auth off (loopback): every request still leaves a usage row, with the runner's own token counts."""
    settings = settings_for(tmp_path, [local("tiny", tiny_model_dir)], usage_flush_seconds=60)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6}
    with gateway(settings, host(4 * GiB)) as (origin, _pool), httpx.Client(base_url=origin, timeout=120) as client:
        whole = client.post("/v1/chat/completions", json={**body, "user": "carol"}).json()
        events = []
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    rows = usage_rows(tmp_path)
    assert [(r["model"], r["provider"], r["key_id"], r["status"]) for r in rows] == [("tiny", "local", None, 200)] * 2
    assert rows[0]["end_user"] == "carol"
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (
        whole["usage"]["prompt_tokens"],
        whole["usage"]["completion_tokens"],
    )
    assert all(e.get("usage") is None for e in events)  # not asked for: the usage chunk was not relayed
    assert rows[1]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert rows[1]["completion_tokens"] == whole["usage"]["completion_tokens"]  # greedy: the same answer
    assert rows[1]["ttft_seconds"] is not None and rows[0]["ttft_seconds"] is None


def test_sigterm_writes_every_usage_row(tmp_path: Path) -> None:
    """Rows wait in memory for the next flush (here: far away); SIGTERM's shutdown writes them all."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    with serve_fake(FakeOpenAI(models=("m1",))) as fake:
        env = {
            **os.environ,
            "MEMSERVE_DATA_DIR": str(tmp_path / "data"),
            "MEMSERVE_USAGE_FLUSH_SECONDS": "600",
            "MEMSERVE_PROVIDERS": json.dumps([{"name": "fake", "base_url": fake.base_url, "models": ["m1"]}]),
        }
        command = [sys.executable, "-m", "memserve", "serve", "--port", str(port), "--log-level", "warning"]
        with (tmp_path / "serve.log").open("wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_until_healthy(origin, proc, log=tmp_path / "serve.log")
            with httpx.Client(base_url=origin, timeout=30) as client:
                for i in range(5):
                    assert client.post("/v1/chat/completions", json={**CHAT, "user": f"u{i}"}).status_code == 200
                assert client.get("/health").json()["usage"]["pending_rows"] == 5  # none written yet
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = usage_rows(tmp_path)
    assert [r["end_user"] for r in rows] == [f"u{i}" for i in range(5)]
    assert all(r["completion_tokens"] == 5 for r in rows)


def test_the_cli_manages_keys_on_a_running_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from memserve.cli import main

    runner = CliRunner()
    with keyed_gateway(tmp_path, monkeypatch) as (origin, _fake):
        monkeypatch.delenv("MEMSERVE_ADMIN_KEY")  # the CLI's key comes from --api-key here
        remote = ["--url", origin, "--api-key", ADMIN]
        created = runner.invoke(main, ["keys", "create", "team", "--tpm", "1000", *remote])
        assert created.exit_code == 0, created.output
        secret = created.stdout.strip()
        with httpx.Client(base_url=origin, timeout=30, headers={"Authorization": f"Bearer {secret}"}) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        [row] = json.loads(runner.invoke(main, ["keys", "list", "--json", *remote]).stdout)
        assert (row["name"], row["tpm"], row["revoked_at"]) == ("team", 1000, None)
        no_key = runner.invoke(main, ["keys", "list", "--url", origin])
        assert no_key.exit_code == 1 and "API key" in no_key.output
        not_admin = runner.invoke(main, ["keys", "list", "--url", origin, "--api-key", secret])
        assert not_admin.exit_code == 1 and "admin key" in not_admin.output
        assert runner.invoke(main, ["keys", "revoke", "team", *remote]).exit_code == 0
        with httpx.Client(base_url=origin, timeout=30, headers={"Authorization": f"Bearer {secret}"}) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        csv_out = runner.invoke(main, ["usage", "--by", "model", "--csv", *remote])
        assert csv_out.exit_code == 0, csv_out.output
        assert csv_out.stdout.splitlines()[0].startswith("model,") and "fake/m1" in csv_out.stdout


def test_serve_refuses_a_corrupt_store_before_serving_and_never_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from memserve.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "memserve.db").write_bytes(b"not a database at all")
    monkeypatch.setenv("MEMSERVE_DATA_DIR", str(data))
    result = CliRunner().invoke(main, ["serve", "--port", "0"])
    assert result.exit_code == 1
    assert f"{data / 'memserve.db'} is not a SQLite database" in result.output and "move it aside" in result.output
    assert (data / "memserve.db").read_bytes() == b"not a database at all"


def test_refused_requests_do_not_spend_a_keys_rate_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with keyed_gateway(tmp_path, monkeypatch) as (origin, _fake):
        secret = new_key(origin, "narrow", rpm=2, models=["fake/m1"])
        with httpx.Client(base_url=origin, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as client:
            refused = [client.post("/v1/chat/completions", json={**CHAT, "model": "fake/m2"}) for _ in range(3)]
            bad = client.post("/v1/chat/completions", json={**CHAT, "stream": "yes"})  # the gateway's own check
            served = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(3)]
    assert [r.status_code for r in refused] == [403] * 3 and bad.status_code == 400
    assert served == [200, 200, 429]  # only the two admitted requests spent the 2 per minute
    rows = usage_rows(tmp_path)
    assert [(r["status"], bool(r["admitted"])) for r in rows] == [(403, False)] * 3 + [(400, False)] + [
        (200, True),
        (200, True),
        (429, False),
    ]


@pytest.mark.parametrize(
    ("script", "error_type"),
    [(Script(die_after_tokens=2), "upstream_unavailable"), (Script(error_after_tokens=2), "generation_failed")],
    ids=["broken off", "error event"],
)
def test_a_stream_that_fails_midway_is_recorded_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: Script, error_type: str
) -> None:
    with keyed_gateway(tmp_path, monkeypatch) as (origin, fake):
        secret = new_key(origin, "app")
        fake.script = script
        with (
            httpx.Client(base_url=origin, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=STREAMED) as answer,
        ):
            lines = [line for line in answer.iter_lines() if line]
    assert any('"error"' in line for line in lines) and lines[-1] == "data: [DONE]"
    [row] = usage_rows(tmp_path)
    assert (row["status"], row["error_type"], row["completion_tokens"]) == (200, error_type, 2)
