"""``memserve ps/load/unload`` through click's runner against a fake gateway served by uvicorn on 127.0.0.1.

The fake speaks the management contract (``/api/ps``, ``/api/load``, ``/api/unload``) with canned rows and
records what the CLI sent; a few client edge cases (timeouts, a server that is not memserve) go through
``httpx.MockTransport`` instead.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from rich.console import Console

from memserve.cli import main
from memserve.cli.manage import (
    GatewayClient,
    LoadProgress,
    ModelRow,
    PsReply,
    format_expiry,
    format_relative,
    progress_line,
    ready_line,
    render_ps,
    usage_bar,
)
from memserve.errors import BadUpstream, InvalidArgument, MemserveError, UpstreamUnavailable
from memserve.pool.events import PoolEvent
from tests.serving import free_port, serve_app

NOW = 1_795_000_000.0
CPU = {
    "capacity_bytes": 24_000_000_000,
    "headroom_bytes": 536_870_912,
    "usable_bytes": 23_463_129_088,
    "held_bytes": 500_000_000,
    "free_bytes": 22_963_129_088,
}


def demo_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": "demo",
        "state": "ready",
        "pid": 4242,
        "source": "/abs/models/demo-tiny",
        "rung": "cpu",
        "devices": {"cpu": {"reserved_bytes": 500_000_000, "measured_bytes": 420_000_000}},
        "leases": 1,
        "queued": 0,
        "pinned": False,
        "expires_at": None,
        "load_seconds": 3.2,
        "reason": None,
    }
    row.update(overrides)
    return row


def error_body(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "api_error", "param": None, "code": code}}


NOFIT = "huge needs 80.0 GiB on cpu but 21.9 GiB is free; fits with 4-bit: 20.1 GiB"


class FakeGateway:
    """Canned answers of the management API, and the JSON bodies it was sent."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ps_reply: dict[str, Any] = {"models": [], "devices": {"cpu": CPU}}
        self.bodies: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.load_events: dict[str, list[dict[str, Any]]] = {}  # model -> events its load emits, in order
        self.has_events = True

    def emit(self, event: str, model: str, **fields: Any) -> None:
        self.events.append({"seq": len(self.events) + 1, "time": NOW, "event": event, "model": model, **fields})

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/api/ps")
        def api_ps() -> dict[str, Any]:
            return self.ps_reply

        @app.get("/api/events")
        def api_events(since: int = 0) -> JSONResponse:
            if not self.has_events:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            return JSONResponse({"events": [e for e in self.events if e["seq"] > since]})

        @app.post("/api/load")
        async def api_load(request: Request) -> JSONResponse:
            body = await request.json()
            self.bodies.append(body)
            for event in self.load_events.get(body["model"], []):
                self.emit(**event)
                await asyncio.sleep(0.05)  # the CLI polls while the load goes on
            if body["model"] == "huge":
                return JSONResponse(error_body(NOFIT, "insufficient_memory"), status_code=507)
            if body["model"] == "doomed":
                return JSONResponse({"model": demo_row(name="doomed", state="failed", reason="runner exited (OOM)")})
            return JSONResponse({"model": demo_row(name=body["model"])})

        @app.post("/api/unload")
        async def api_unload(request: Request) -> JSONResponse:
            body = await request.json()
            self.bodies.append(body)
            if body["model"] == "nope":
                return JSONResponse(
                    error_body("no model named 'nope'; see memserve ps", "model_not_found"), status_code=404
                )
            return JSONResponse({"model": body["model"], "unloaded": body["model"] == "demo"})

        return app


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeGateway, str]]:
    gateway = FakeGateway()
    with serve_app(gateway.app()) as url:
        yield gateway, url


@pytest.fixture
def gateway(served: tuple[FakeGateway, str]) -> FakeGateway:
    served[0].reset()
    return served[0]


@pytest.fixture
def url(served: tuple[FakeGateway, str]) -> str:
    return served[1]


def cli(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run ``memserve ARGS`` with stdout piped (not a terminal) and no COLUMNS, as a script would."""
    return CliRunner().invoke(main, list(args), env={"COLUMNS": None, **(env or {})})


# --- ps ---------------------------------------------------------------------------------------------------


def test_ps_table_shows_models_states_sizes_and_devices(gateway: FakeGateway, url: str) -> None:
    gateway.ps_reply["models"] = [
        demo_row(leases=0, expires_at=time.time() + 250),
        demo_row(
            name="big",
            state="loading",
            pid=None,
            rung="cpu-int8",
            leases=0,
            load_seconds=None,
            devices={"cpu": {"reserved_bytes": 2 * 1024**3, "measured_bytes": None}},
        ),
        demo_row(
            name="warm",
            state="warming",
            pid=77,
            leases=0,
            load_seconds=None,
            devices={"cpu": {"reserved_bytes": 1024**3, "measured_bytes": 0}},
        ),
        demo_row(name="keeper", pinned=True, leases=0),
        demo_row(
            name="broken",
            state="failed",
            pid=None,
            devices={},
            leases=0,
            reason="runner exited with SIGKILL while loading (watchdog: 3.1 GiB over plan)",
        ),
    ]
    result = cli("ps", "--url", url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for header in ("NAME", "STATE", "PID", "RUNG", "MEMORY", "LEASES", "EXPIRES"):
        assert header in out
    lines = out.splitlines()
    demo = next(line for line in lines if "demo" in line)
    assert "ready" in demo and "4242" in demo and "cpu 400.5 MiB / 476.8 MiB ▕█" in demo and "in 4m" in demo
    big = next(line for line in lines if "big" in line)
    assert "loading" in big and "cpu-int8" in big and "cpu - / 2.0 GiB" in big
    warm = next(line for line in lines if "warm" in line)
    assert "warming" in warm and "cpu - / 1.0 GiB" in warm and " - " in warm.split("GiB")[-1]
    keeper = next(line for line in lines if "keeper" in line)
    assert "never (pinned)" in keeper
    assert "broken failed: runner exited with SIGKILL while loading (watchdog: 3.1 GiB over plan)" in out
    assert "cpu: held 476.8 MiB of 21.9 GiB usable ▕█░░░░░░░░░▏ 21.4 GiB free" in out


def test_ps_json_is_the_servers_json(gateway: FakeGateway, url: str) -> None:
    gateway.ps_reply["models"] = [demo_row(expires_at=NOW)]
    result = cli("ps", "--json", env={"MEMSERVE_URL": url})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == gateway.ps_reply


def test_ps_with_nothing_loaded_says_so_and_shows_devices(gateway: FakeGateway, url: str) -> None:
    result = cli("ps", "--url", url)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "no models loaded"
    assert "NAME" not in result.stdout
    assert "cpu: held 476.8 MiB of 21.9 GiB usable" in result.stdout


def test_ps_reply_of_another_shape_is_a_one_line_error(gateway: FakeGateway, url: str) -> None:
    gateway.ps_reply = {"models": [{"name": "demo"}], "devices": {}}
    result = cli("ps", "--url", url)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: the server's answer to GET /api/ps does not have the expected shape")
    assert "models[0].state" in result.stderr and result.stderr.count("\n") == 1


def test_ready_state_is_green_and_failed_red_on_a_terminal() -> None:
    reply = PsReply.model_validate(
        {"models": [demo_row(), demo_row(name="x", state="failed", reason="boom")], "devices": {"cpu": CPU}}
    )
    out = io.StringIO()
    render_ps(reply, Console(file=out, force_terminal=True, color_system="standard", width=200), now_seconds=NOW)
    text = out.getvalue()
    assert "\x1b[32mready" in text and "\x1b[31mfailed" in text


# --- load / unload ----------------------------------------------------------------------------------------


def test_load_prints_the_ready_line_and_sends_keep_alive(gateway: FakeGateway, url: str) -> None:
    result = cli("load", "demo", "--keep-alive", "10m", "--url", url)
    assert result.exit_code == 0, result.output
    assert result.stdout == "demo ready on cpu (rung cpu), 400.5 MiB measured, loaded in 3.2 s\n"
    assert gateway.bodies == [{"model": "demo", "keep_alive": "10m"}]


def test_load_without_keep_alive_leaves_it_to_the_server(gateway: FakeGateway, url: str) -> None:
    result = cli("load", "demo", "--json", "--url", url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"model": demo_row()}
    assert gateway.bodies == [{"model": "demo"}]


def test_load_that_does_not_fit_prints_the_servers_message(gateway: FakeGateway, url: str) -> None:
    result = cli("load", "huge", "--url", url)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"error: {NOFIT}\n"


def test_load_answered_with_a_failed_row_is_an_error(gateway: FakeGateway, url: str) -> None:
    result = cli("load", "doomed", "--url", url)
    assert result.exit_code == 1
    assert result.stderr == "error: doomed failed to load: runner exited (OOM)\n"


def test_ready_line_falls_back_to_reserved_bytes_before_a_measurement() -> None:
    row = ModelRow.model_validate(
        demo_row(
            name="big",
            rung="gpu-cpu-split",
            load_seconds=None,
            devices={
                "cuda:0": {"reserved_bytes": 20 * 1024**3, "measured_bytes": None},
                "cpu": {"reserved_bytes": 2 * 1024**3, "measured_bytes": 0},
            },
        )
    )
    assert ready_line(row) == "big ready on cuda:0, cpu (rung gpu-cpu-split), 22.0 GiB reserved"


DEMO_LOAD = [
    {"event": "evict", "model": "small", "reason": "to make room for demo"},
    {"event": "phase", "model": "other", "phase": "map", "seconds": 9.0},  # another model's load: not shown
    {"event": "load", "model": "demo", "rung": "cpu", "reserved_bytes": {"cpu": 600 * 1024**2}},
    {"event": "phase", "model": "demo", "phase": "resolve", "seconds": 0.04},
    {"event": "phase", "model": "demo", "phase": "map", "seconds": 0.8},
    {"event": "phase", "model": "demo", "phase": "fault_in", "seconds": 1.2},
    {"event": "phase", "model": "demo", "phase": "warm_up", "seconds": 0.31},
    {
        "event": "reserve",
        "model": "demo",
        "reserved_bytes": {"cpu": 700 * 1024**2},
        "reason": "its warm-up peaked at 700.0 MiB on cpu, above its reservation of 600.0 MiB on cpu",
    },
    {"event": "ready", "model": "demo", "pid": 4242, "load_seconds": 3.1, "measured_bytes": {"cpu": 512 * 1024**2}},
]
DEMO_PROGRESS = [
    "evicting small (to make room)",
    "loading demo as cpu, reserving 600.0 MiB on cpu",
    "resolve 0.0 s",
    "map 0.8 s",
    "fault_in 1.2 s",
    "warm_up 0.3 s",
    "reserving 700.0 MiB on cpu instead: its warm-up peaked at 700.0 MiB on cpu, above its reservation of 600.0 MiB "
    "on cpu",
    "ready in 3.1 s (measured 512.0 MiB on cpu, reserved 700.0 MiB on cpu)",
]


def test_load_shows_each_step_of_its_load_on_stderr(gateway: FakeGateway, url: str) -> None:
    gateway.emit("phase", "demo", phase="map", seconds=5.0)  # an earlier load's event: before this command
    gateway.load_events["demo"] = DEMO_LOAD
    result = cli("load", "demo", "--url", url)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == DEMO_PROGRESS
    assert result.stdout == "demo ready on cpu (rung cpu), 400.5 MiB measured, loaded in 3.2 s\n"


def test_load_json_keeps_stdout_to_the_json_and_progress_on_stderr(gateway: FakeGateway, url: str) -> None:
    gateway.load_events["demo"] = DEMO_LOAD
    result = cli("load", "demo", "--json", "--url", url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"model": demo_row()}
    assert result.stderr.splitlines() == DEMO_PROGRESS


def test_a_failed_load_shows_why_before_the_error(gateway: FakeGateway, url: str) -> None:
    gateway.load_events["doomed"] = [
        {"event": "backoff", "model": "doomed", "seconds": 2.0},
        {"event": "load", "model": "doomed", "rung": "cpu", "reserved_bytes": {"cpu": 1024**3}},
        {"event": "watchdog_kill", "model": "doomed", "pid": 7, "reason": "stopped by the watchdog: cpu use 1.5 GiB"},
        {"event": "retry_lower", "model": "doomed", "failed_rung": "cpu", "reason": "stopped by the watchdog"},
        {"event": "load_failed", "model": "doomed", "reason": "runner exited (OOM)"},
    ]
    result = cli("load", "doomed", "--url", url)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "waiting 2.0 s before loading doomed again: it failed just before",
        "loading doomed as cpu, reserving 1.0 GiB on cpu",
        "the watchdog stopped doomed: stopped by the watchdog: cpu use 1.5 GiB",
        "retrying one rung below cpu",
        "load failed: runner exited (OOM)",
        "error: doomed failed to load: runner exited (OOM)",
    ]


def test_a_server_without_events_still_loads_without_progress(gateway: FakeGateway, url: str) -> None:
    gateway.has_events = False
    gateway.load_events["demo"] = DEMO_LOAD
    result = cli("load", "demo", "--url", url)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.startswith("demo ready on cpu")


def test_progress_on_a_terminal_prints_the_lines_above_a_spinner() -> None:
    events = [{"seq": i + 1, **e} for i, e in enumerate(DEMO_LOAD)]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        since = int(request.url.params["since"])
        seen.append(str(since))
        if len(seen) == 1:
            return httpx.Response(200, json={"events": []})  # before the load: nothing yet
        return httpx.Response(200, json={"events": [e for e in events if e["seq"] > since]})

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with mock_client(handler) as client, LoadProgress(client, "demo", console) as progress:
        deadline = time.monotonic() + 30
        while len(progress.lines) < len(DEMO_PROGRESS) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert progress.lines == DEMO_PROGRESS
    assert seen[0] == "0" and all(line in out.getvalue() for line in DEMO_PROGRESS)


@pytest.mark.parametrize(
    ("event", "line"),
    [
        ({"event": "evict", "model": "small", "reason": "to make room for other"}, None),
        ({"event": "evict", "model": "small", "reason": "to make room for demo"}, "evicting small (to make room)"),
        (
            {"event": "refused", "model": "demo", "reason": "needs 9 GiB", "code": "insufficient_memory"},
            "refused: needs 9 GiB",
        ),
        (
            {"event": "ready", "model": "demo", "load_seconds": 2.0, "measured_bytes": {}},
            "ready in 2.0 s (not measured)",
        ),
        ({"event": "stopped", "model": "demo", "reason": "unloaded"}, None),
        (
            {
                "event": "reserve",
                "model": "demo",
                "reserved_bytes": {"cpu": 2 * 1024**3},
                "reason": "its warm-up peaked",
            },
            "reserving 2.0 GiB on cpu instead: its warm-up peaked",
        ),
        (
            {"event": "rung_lower", "model": "demo", "failed_rung": "gpu", "rung": "cpu", "reason": "needs 9 GiB"},
            "gpu does not fit: needs 9 GiB; trying cpu",
        ),
        (
            {"event": "retry", "model": "demo", "rung": "cpu", "reserved_bytes": {"cpu": 1024**3}, "reason": "killed"},
            "trying cpu again, reserving 1.0 GiB on cpu: killed",
        ),
        (
            {"event": "learned", "model": "demo", "rung": "cpu", "next_reserved_bytes": {"cpu": 1024**3}},
            "learned: as cpu it needs 1.0 GiB on cpu",
        ),
        ({"event": "phase", "model": "other", "phase": "map", "seconds": 1.0}, None),
    ],
)
def test_progress_line(event: dict[str, Any], line: str | None) -> None:
    assert progress_line(PoolEvent.from_json({"seq": 1, **event}), "demo") == line


@pytest.mark.parametrize(("name", "said"), [("demo", "unloaded demo\n"), ("idle", "idle was not loaded\n")])
def test_unload_says_whether_it_was_loaded(gateway: FakeGateway, url: str, name: str, said: str) -> None:
    result = cli("unload", name, "--url", url)
    assert result.exit_code == 0, result.output
    assert result.stdout == said
    assert gateway.bodies == [{"model": name}]


def test_unload_of_an_unknown_model_is_the_servers_404_message(gateway: FakeGateway, url: str) -> None:
    result = cli("unload", "nope", "--url", url)
    assert result.exit_code == 1
    assert result.stderr == "error: no model named 'nope'; see memserve ps\n"


# --- no server, wrong server ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["ps"], ["load", "demo"], ["unload", "demo"]])
def test_nothing_listening_is_one_line_with_the_hint(args: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(*args, "--url", url)
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: no memserve server at {url} (connection refused); start one with memserve serve, or pass --url\n"
    )


def test_default_url_comes_from_the_environment_then_the_builtin() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert f"no memserve server at {url} " in cli("ps", env={"MEMSERVE_URL": url}).stderr
    assert cli("ps", "--help").stdout.count("http://127.0.0.1:8000") == 1


def mock_client(handler: Any) -> GatewayClient:
    return GatewayClient("http://gateway.test", transport=httpx.MockTransport(handler))


def test_a_server_that_is_not_memserve_is_named_as_such() -> None:
    client = mock_client(lambda request: httpx.Response(404, json={"detail": "Not Found"}))
    with pytest.raises(BadUpstream, match=r"answered GET /api/ps with HTTP 404 and .*Not Found.*pass --url"):
        client.ps()
    client = mock_client(lambda request: httpx.Response(200, text="<html>hello</html>"))
    with pytest.raises(BadUpstream, match="HTTP 200 and '<html>hello</html>'"):
        client.ps()


def test_error_body_keeps_status_code_and_param() -> None:
    body = {"error": {"message": "busy", "type": "api_error", "param": "model", "code": "memory_busy"}}
    client = mock_client(lambda request: httpx.Response(503, json=body))
    with pytest.raises(MemserveError, match=r"^busy$") as info:
        client.load("demo")
    assert (info.value.status_code, info.value.code, info.value.param) == (503, "memory_busy", "model")


def test_a_load_that_times_out_says_it_may_still_finish() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.extensions["timeout"]["read"] == 15 * 60
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(UpstreamUnavailable, match="within 900 s; the load may still finish: check with memserve ps"):
        mock_client(handler).load("demo")


def test_a_url_that_is_not_http_is_a_usage_error() -> None:
    with pytest.raises(InvalidArgument, match="not an http"):
        GatewayClient("ftp://127.0.0.1:8000")


# --- formatting -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta_seconds", "text"),
    [
        (-5, "now"),
        (0, "now"),
        (45, "in 45s"),
        (250, "in 4m"),
        (3600, "in 1h"),
        (4000, "in 1h 6m"),
        (2 * 86400, "in 2d"),
        (200_000, "in 2d 7h"),
    ],
)
def test_format_relative(delta_seconds: float, text: str) -> None:
    assert format_relative(delta_seconds) == text


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"expires_at": NOW + 90}, "in 1m"),
        ({"expires_at": None, "leases": 0}, "never"),
        ({"expires_at": None, "leases": 0, "pinned": True}, "never (pinned)"),
        ({"expires_at": None, "leases": 2}, "in use"),
        ({"expires_at": None, "state": "loading"}, "-"),
        ({"expires_at": NOW + 90, "state": "failed"}, "-"),
    ],
)
def test_format_expiry(overrides: dict[str, Any], text: str) -> None:
    assert format_expiry(ModelRow.model_validate(demo_row(**overrides)), NOW) == text


@pytest.mark.parametrize(
    ("used", "total", "cells"), [(0, 100, 0), (1, 10**9, 1), (50, 100, 5), (100, 100, 10), (300, 100, 10)]
)
def test_usage_bar_fills_by_fraction(used: int, total: int, cells: int) -> None:
    assert usage_bar(used, total).plain == "▕" + "█" * cells + "░" * (10 - cells) + "▏"
