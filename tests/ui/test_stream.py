"""``GET /api/events/stream`` and the page's files: the backlog, live events, the end of a stream whose client
went away (no listener, no task left), and who may read it with keys on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from memserve.gateway.ui import LiveStreams, close_live_streams
from memserve.pool.events import EventLog, PoolEventKind
from memserve.wire.routes import UI_ROUTES
from tests.gateway.test_gateway_process import GiB, host, settings_for
from tests.ui.live import Live, live_gateway, read_frames, wait_for

ADMIN = "ms-admin-bootstrap-secret-for-ui-tests"
STREAM = "/api/events/stream"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with live_gateway(settings_for(tmp_path, []), host(4 * GiB)) as served:
        yield served


# ---------------------------------------------------------------------------------------------- LiveStreams


async def take(frames: AsyncGenerator[bytes, None], count: int) -> list[str]:
    return [(await anext(frames)).decode() for _ in range(count)]


def test_a_stream_sends_the_backlog_after_since_then_each_new_event() -> None:
    async def run() -> None:
        log = EventLog(lambda: 1.5)
        for model in ("a", "b", "c"):
            log.add(PoolEventKind.LOAD, model, {"rung": "cpu"})
        frames = LiveStreams(log).frames(since=1)
        assert await take(frames, 2) == [
            'id: 2\nevent: pool\ndata: {"seq":2,"time":1.5,"event":"load","model":"b","rung":"cpu"}\n\n',
            'id: 3\nevent: pool\ndata: {"seq":3,"time":1.5,"event":"load","model":"c","rung":"cpu"}\n\n',
        ]
        waiting = asyncio.ensure_future(anext(frames))
        await asyncio.sleep(0)
        assert not waiting.done()  # nothing new: the stream waits for the pool
        log.add(PoolEventKind.EVICT, "b", {"reason": "to make room for d"})
        assert (await waiting).decode().startswith('id: 4\nevent: pool\ndata: {"seq":4,')
        await frames.aclose()

    asyncio.run(run())


def test_a_client_from_before_a_restart_is_told_and_gets_everything() -> None:
    async def run() -> None:
        log = EventLog(lambda: 0.0)
        log.add(PoolEventKind.LOAD, "a", {})
        frames = LiveStreams(log).frames(since=40)  # a Last-Event-ID from the previous server
        first, second = await take(frames, 2)
        assert first == 'event: reset\ndata: {"since":40,"newest":1}\n\n'
        assert second.startswith("id: 1\nevent: pool\n")
        await frames.aclose()

    asyncio.run(run())


def test_a_client_further_behind_than_the_log_keeps_is_told_what_it_missed() -> None:
    async def run() -> None:
        log = EventLog(lambda: 0.0, kept=2)
        for model in "abcd":
            log.add(PoolEventKind.LOAD, model, {})
        frames = LiveStreams(log).frames(since=1)
        gap, third, fourth = await take(frames, 3)
        assert gap == 'event: gap\ndata: {"after":1,"next":3}\n\n'
        assert third.startswith("id: 3\n") and fourth.startswith("id: 4\n")
        await frames.aclose()

    asyncio.run(run())


def test_an_idle_stream_sends_a_comment_so_proxies_keep_it_open() -> None:
    async def run() -> None:
        frames = LiveStreams(EventLog(lambda: 0.0), heartbeat_seconds=0.01).frames(since=0)
        assert await take(frames, 2) == [": keep-alive\n\n", ": keep-alive\n\n"]
        await frames.aclose()

    asyncio.run(run())


def test_close_ends_every_stream_and_unsubscribes_it() -> None:
    async def run() -> None:
        log = EventLog(lambda: 0.0)
        streams = LiveStreams(log)
        frames = [streams.frames(since=0) for _ in range(3)]
        waiting = [asyncio.ensure_future(anext(f)) for f in frames]
        await asyncio.sleep(0)
        assert streams.open == 3 and len(log._listeners) == 3
        streams.close()
        for future in waiting:
            with pytest.raises(StopAsyncIteration):
                await future
        assert streams.open == 0 and log._listeners == []

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------- over HTTP


def test_the_route_sends_the_backlog_after_since_or_last_event_id_then_live_events(live: Live) -> None:
    for model in ("a", "b", "c"):
        live.add_event(PoolEventKind.LOAD, model, rung="cpu", reserved_bytes={"cpu": 1024})
    with httpx.stream("GET", f"{live.origin}{STREAM}?since=1", timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        lines = response.iter_lines()
        backlog = read_frames(lines, 2)
        assert [(f["id"], f["event"], f["data"]["model"]) for f in backlog] == [("2", "pool", "b"), ("3", "pool", "c")]
        assert backlog[0]["data"]["reserved_bytes"] == {"cpu": 1024}
        seq = live.add_event(PoolEventKind.EVICT, "b", reason="to make room for d")
        (evicted,) = read_frames(lines, 1)
        assert evicted["id"] == str(seq) and evicted["data"]["event"] == "evict"
        assert evicted["data"]["reason"] == "to make room for d"
    headers = {"Last-Event-ID": "3"}  # a reconnecting client: the header wins over ?since
    with httpx.stream("GET", f"{live.origin}{STREAM}?since=0", headers=headers, timeout=20) as response:
        (first,) = read_frames(response.iter_lines(), 1)
        assert first["id"] == "4" and first["data"]["event"] == "evict"


def test_a_client_that_goes_away_leaves_no_listener_and_no_task(live: Live) -> None:
    baseline = live.tasks()
    assert live.listeners() == 0
    with ExitStack() as open_streams:
        for _ in range(3):
            client = open_streams.enter_context(httpx.Client(timeout=20))
            response = open_streams.enter_context(client.stream("GET", f"{live.origin}{STREAM}"))
            assert response.status_code == 200
        live.add_event(PoolEventKind.LOAD, "a")  # each stream sends it: all three are being served now
        assert live.listeners() == 3 and live.tasks() > baseline
    # the clients closed their connections: the server notices, ends each stream and unsubscribes it
    wait_for(lambda: live.listeners() == 0 and live.tasks() == baseline, "the streams to end on the server")
    assert live.app.app.state.live_streams.open == 0  # type: ignore[attr-defined]


def test_closing_the_streams_ends_them_for_the_client(live: Live) -> None:
    """What ``memserve serve`` does before uvicorn drains its connections (or an open tab would hold it)."""
    with httpx.stream("GET", f"{live.origin}{STREAM}", timeout=20) as response:
        live.on_loop(lambda: close_live_streams(live.app))
        assert list(response.iter_lines()) == []  # the response ended: the iteration stops
    wait_for(lambda: live.listeners() == 0, "the stream to unsubscribe")


@pytest.mark.parametrize(
    ("query", "headers", "param"),
    [("?since=-1", {}, "since"), ("", {"Last-Event-ID": "seven"}, "Last-Event-ID")],
)
def test_a_bad_start_is_a_400_naming_it(live: Live, query: str, headers: dict[str, str], param: str) -> None:
    answer = httpx.get(f"{live.origin}{STREAM}{query}", headers=headers, timeout=20)
    assert answer.status_code == 400, answer.text
    assert param in answer.text and answer.json()["error"]["code"] == "invalid_argument"


def test_with_keys_on_the_page_is_public_and_the_stream_needs_an_admin_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSERVE_ADMIN_KEY", ADMIN)
    with live_gateway(settings_for(tmp_path, [], auth="keys"), host(4 * GiB)) as served:
        origin = served.origin
        media = {"/ui": "text/html", "/ui/app.js": "text/javascript", "/ui/style.css": "text/css"}
        assert sorted(media) == sorted(route.path for route in UI_ROUTES)
        for path, media_type in media.items():
            answer = httpx.get(f"{origin}{path}", timeout=20)  # no key: the files hold no data
            assert answer.status_code == 200 and answer.headers["content-type"].startswith(media_type)
            assert "default-src 'self'" in answer.headers["content-security-policy"]
        assert 'id="login"' in httpx.get(f"{origin}/ui", timeout=20).text
        served.add_event(PoolEventKind.REFUSED, "big", reason="big does not fit", code="insufficient_memory")

        anonymous = httpx.get(f"{origin}{STREAM}", timeout=20)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
        admin = {"Authorization": f"Bearer {ADMIN}"}
        user = httpx.post(f"{origin}/api/keys", json={"name": "user"}, headers=admin, timeout=20).json()["secret"]
        refused = httpx.get(f"{origin}{STREAM}", headers={"Authorization": f"Bearer {user}"}, timeout=20)
        assert refused.status_code == 403 and "admin key" in refused.json()["error"]["message"]
        with httpx.stream("GET", f"{origin}{STREAM}", headers=admin, timeout=20) as response:
            assert response.status_code == 200
            (refusal,) = read_frames(response.iter_lines(), 1)
            assert refusal["data"]["event"] == "refused" and refusal["data"]["reason"] == "big does not fit"
