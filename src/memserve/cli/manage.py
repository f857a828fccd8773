"""``memserve ps``, ``memserve load NAME``, ``memserve unload NAME``: clients of a running gateway.

They speak the management API (``GET /api/ps``, ``POST /api/load``, ``POST /api/unload``) and never
touch models themselves: only the gateway's pool starts or stops runners. ``--json`` prints the
server's JSON unchanged, for scripts; without it the answer is a rich table or one line.

Failures are ``MemserveError``s, so the ``memserve`` group prints one line and exits 1: nothing
listening (with the hint to start a server or pass ``--url``), a timeout, an OpenAI error body from the
gateway (its message as-is, e.g. the planner's NoFit), or a reply that is not memserve's.

``memserve load`` shows the load's progress while it waits: it polls ``GET /api/events`` beside the
``POST /api/load`` and prints the events of that load (evictions made for it, the load, each phase,
ready, or why it failed) as lines on stderr, so stdout keeps only the result (or the JSON) for scripts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
import httpx
from pydantic import BaseModel, ValidationError
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from memserve.errors import BadUpstream, InvalidArgument, MemserveError, RunnerFailed, UpstreamUnavailable
from memserve.net import is_loopback
from memserve.pool.events import PoolEvent, PoolEventKind
from memserve.pool.state import ModelState
from memserve.units import format_bytes
from memserve.wire.format import param_path

DEFAULT_URL = "http://127.0.0.1:8000"
CONNECT_TIMEOUT_SECONDS = 5.0
PS_TIMEOUT_SECONDS = 30.0
# unloading drains a model's leases first, and a load faults in weights and runs a warm-up forward
UNLOAD_TIMEOUT_SECONDS = 5 * 60.0
LOAD_TIMEOUT_SECONDS = 15 * 60.0
EVENTS_TIMEOUT_SECONDS = 10.0
PROGRESS_POLL_SECONDS = 0.2
BAR_WIDTH = 10
PIPED_WIDTH = 200

_STATE_STYLES: dict[str, str] = {
    ModelState.READY: "green",
    ModelState.STARTING: "yellow",
    ModelState.LOADING: "yellow",
    ModelState.WARMING: "yellow",
    ModelState.DRAINING: "magenta",
    ModelState.STOPPED: "dim",
    ModelState.FAILED: "red",
}
_COLUMNS = ("NAME", "STATE", "PID", "RUNG", "MEMORY", "LEASES", "EXPIRES")
_Reply = TypeVar("_Reply", bound=BaseModel)


# --- the replies, as the gateway's management API defines them --------------------------------------------


class DeviceUse(BaseModel):
    """What one loaded model holds on one device: reserved by its plan, measured after warm-up (or not yet)."""

    reserved_bytes: int = 0
    measured_bytes: int | None = None

    @property
    def measured(self) -> int | None:
        """The measured bytes, or None before warm-up: a server may send null or 0 then (no runner uses 0 B)."""
        return self.measured_bytes or None


class ModelRow(BaseModel):
    """One model in the pool, as ``/api/ps`` and ``/api/load`` report it."""

    name: str
    state: str  # a ModelState; kept a str so that a newer server's state is shown, not refused
    pid: int | None = None
    source: str | None = None
    rung: str | None = None
    devices: dict[str, DeviceUse] = {}
    leases: int = 0
    queued: int = 0
    pinned: bool = False
    expires_at: float | None = None
    load_seconds: float | None = None
    reason: str | None = None


class DeviceBudget(BaseModel):
    """One device's ledger: what it has, what is never handed out, and what loaded models hold."""

    capacity_bytes: int
    headroom_bytes: int
    usable_bytes: int
    held_bytes: int
    free_bytes: int


class PsReply(BaseModel):
    """The body of ``GET /api/ps``."""

    models: list[ModelRow]
    devices: dict[str, DeviceBudget] = {}


class LoadReply(BaseModel):
    """The body of ``POST /api/load``: the model's row once it is ready."""

    model: ModelRow


class UnloadReply(BaseModel):
    """The body of ``POST /api/unload``; ``unloaded`` is false when the model was not loaded."""

    model: str
    unloaded: bool


# --- the client ---------------------------------------------------------------------------------------------


class GatewayClient:
    """A sync client of the management API that turns every failure into a one-line ``MemserveError``.

    ``transport`` is the seam for tests (``httpx.MockTransport``). Proxy variables are ignored for a
    loopback URL, as Go's and curl's clients do: a corporate ``HTTPS_PROXY`` must not swallow
    ``127.0.0.1:8000``.
    """

    def __init__(
        self, base_url: str = DEFAULT_URL, *, transport: httpx.BaseTransport | None = None, api_key: str | None = None
    ) -> None:
        """``api_key``: sent as a bearer token; default ``$MEMSERVE_API_KEY``, then ``$MEMSERVE_ADMIN_KEY``."""
        self.base_url = base_url.rstrip("/")
        key = api_key or os.environ.get("MEMSERVE_API_KEY") or os.environ.get("MEMSERVE_ADMIN_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else None
        try:
            url = httpx.URL(self.base_url)
        except httpx.InvalidURL as exc:
            raise InvalidArgument(f"--url {base_url!r} is not a URL ({exc}); expected e.g. {DEFAULT_URL}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise InvalidArgument(f"--url {base_url!r} is not an http(s) URL; expected e.g. {DEFAULT_URL}")
        self._client = httpx.Client(
            base_url=self.base_url, transport=transport, trust_env=not is_loopback(url.host), headers=headers
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ps(self) -> dict[str, Any]:
        """``GET /api/ps`` as the server sent it."""
        return self.request("GET", "/api/ps", timeout_seconds=PS_TIMEOUT_SECONDS)

    def load(self, model: str, *, keep_alive: str | None = None) -> dict[str, Any]:
        """``POST /api/load``; returns once the model is ready, which can take minutes."""
        body: dict[str, Any] = {"model": model}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        return self.request("POST", "/api/load", body, timeout_seconds=LOAD_TIMEOUT_SECONDS)

    def events(self, since: int = 0) -> list[PoolEvent]:
        """``GET /api/events?since=N``: the pool's events after sequence number ``since``, oldest first."""
        data = self.request("GET", f"/api/events?since={since}", timeout_seconds=EVENTS_TIMEOUT_SECONDS)
        events = data.get("events")
        if not isinstance(events, list):
            raise BadUpstream(
                f"{self.base_url} answered GET /api/events without an events list; is the server "
                "the same memserve version as this CLI?"
            )
        return [
            _event(e)
            for e in events
            if isinstance(e, dict)
            and isinstance(e.get("seq"), int)
            and isinstance(e.get("event"), str)
            and isinstance(e.get("model"), str)
        ]

    def unload(self, model: str) -> dict[str, Any]:
        """``POST /api/unload``; the server drains the model's leases before it answers."""
        return self.request("POST", "/api/unload", {"model": model}, timeout_seconds=UNLOAD_TIMEOUT_SECONDS)

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout_seconds: float
    ) -> dict[str, Any]:
        """One call; a JSON object on 2xx, else the server's error message (or ours) as a MemserveError."""
        timeout = httpx.Timeout(timeout_seconds, connect=CONNECT_TIMEOUT_SECONDS)
        try:
            response = self._client.request(method, path, json=body, timeout=timeout)
        except httpx.ConnectError as exc:
            why = "connection refused" if "refused" in str(exc).lower() else str(exc) or type(exc).__name__
            raise UpstreamUnavailable(
                f"no memserve server at {self.base_url} ({why}); start one with memserve serve, or pass --url"
            ) from exc
        except httpx.TimeoutException as exc:
            still = "; the load may still finish: check with memserve ps" if path == "/api/load" else ""
            raise UpstreamUnavailable(
                f"memserve server at {self.base_url} did not answer {method} {path} "
                f"within {timeout_seconds:.0f} s{still}"
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"talking to the memserve server at {self.base_url} failed ({type(exc).__name__}: {exc}); "
                "check that --url points at memserve serve"
            ) from exc
        return self._json_or_raise(response, f"{method} {path}")

    def _json_or_raise(self, response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.is_success and isinstance(data, dict):
            return data
        error = data.get("error") if isinstance(data, dict) else None
        if not response.is_success and isinstance(error, dict) and isinstance(error.get("message"), str):
            exc = MemserveError(
                error["message"], param=_str_or_none(error.get("param")), code=_str_or_none(error.get("code"))
            )
            exc.status_code = response.status_code
            raise exc
        snippet = " ".join(response.text.split())[:200] or "an empty body"
        raise BadUpstream(
            f"{self.base_url} answered {what} with HTTP {response.status_code} and {snippet!r}, not memserve's "
            "JSON; is memserve serve listening there? pass --url to point at it"
        )


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def parse_reply(model: type[_Reply], data: dict[str, Any], what: str) -> _Reply:
    """Validate a reply against the shape this CLI knows; a mismatch means the server is another version."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = param_path(first["loc"]) or "the body"
        raise BadUpstream(
            f"the server's answer to {what} does not have the expected shape ({where}: {first['msg']}); "
            "is the server the same memserve version as this CLI?"
        ) from exc


# --- rendering ----------------------------------------------------------------------------------------------


def usage_bar(used_bytes: int, total_bytes: int, width: int = BAR_WIDTH) -> Text:
    """A bar of ``width`` cells; anything above zero shows at least one cell, so small models stay visible."""
    if total_bytes <= 0:
        return Text("")
    fraction = min(max(used_bytes / total_bytes, 0.0), 1.0)
    filled = round(fraction * width)
    if used_bytes > 0 and filled == 0:
        filled = 1
    style = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    return Text.assemble("▕", ("█" * filled, style), ("░" * (width - filled), "dim"), "▏")


def format_relative(delta_seconds: float) -> str:
    """45 → ``"in 45s"``, 250 → ``"in 4m"``, 4000 → ``"in 1h 6m"``, 200000 → ``"in 2d 7h"``; past → ``"now"``."""
    if delta_seconds <= 0:
        return "now"
    seconds = int(delta_seconds)
    if seconds < 60:
        return f"in {seconds}s"
    if seconds < 3600:
        return f"in {seconds // 60}m"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"in {hours}h {minutes}m" if minutes else f"in {hours}h"
    days, hours = divmod(seconds // 3600, 24)
    return f"in {days}d {hours}h" if hours else f"in {days}d"


def format_expiry(row: ModelRow, now_seconds: float) -> str:
    """When the pool may evict this model. ``expires_at`` is null for pinned, busy or keep-alive-forever models."""
    if row.state in (ModelState.STOPPED, ModelState.FAILED):
        return "-"
    if row.expires_at is not None:
        return format_relative(row.expires_at - now_seconds)
    if row.state != ModelState.READY:
        return "-"
    if row.pinned:
        return "never (pinned)"
    if row.leases or row.queued:
        return "in use"
    return "never"


def _memory_cell(row: ModelRow, devices: dict[str, DeviceBudget]) -> Text:
    lines = []
    for name, use in row.devices.items():
        measured = "-" if use.measured is None else format_bytes(use.measured)
        over = use.measured is not None and use.measured > use.reserved_bytes
        line = Text.assemble(f"{name} ", (measured, "red" if over else ""), f" / {format_bytes(use.reserved_bytes)}")
        budget = devices.get(name)
        if budget is not None:
            held_bytes = max(use.reserved_bytes, use.measured or 0)
            line.append(" ").append_text(usage_bar(held_bytes, budget.usable_bytes))
        lines.append(line)
    return Text("\n").join(lines) if lines else Text("-")


def _leases_cell(row: ModelRow) -> str:
    return f"{row.leases} (+{row.queued} queued)" if row.queued else str(row.leases)


def device_line(name: str, budget: DeviceBudget) -> Text:
    """``cpu: held 477 MiB of 21.9 GiB usable ▕█░░░░░░░░░▏ 21.4 GiB free``."""
    return Text.assemble(
        (f"{name}:", "bold"),
        f" held {format_bytes(budget.held_bytes)} of {format_bytes(budget.usable_bytes)} usable ",
        usage_bar(budget.held_bytes, budget.usable_bytes),
        f" {format_bytes(budget.free_bytes)} free",
    )


def render_ps(reply: PsReply, console: Console, *, now_seconds: float) -> None:
    """The ps table, one line per failed model's reason (too long for a cell), then one line per device."""
    if not reply.models:
        console.print("no models loaded")
    else:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
        for column in _COLUMNS:
            # on a narrow terminal cells wrap at spaces (a pid or a lease count never splits)
            table.add_column(
                column,
                justify="right" if column in ("PID", "LEASES") else "left",
                overflow="fold",
                no_wrap=column in ("PID", "LEASES"),
            )
        for row in reply.models:
            state = Text(row.state, style=_STATE_STYLES.get(row.state, ""))
            if row.pinned:
                state.append(" pinned", style="dim")
            table.add_row(
                Text(row.name, style="bold"),
                state,
                "-" if row.pid is None else str(row.pid),
                row.rung or "-",
                _memory_cell(row, reply.devices),
                _leases_cell(row),
                format_expiry(row, now_seconds),
            )
        console.print(table)
        for row in reply.models:
            if row.state == ModelState.FAILED:
                console.print(Text.assemble((f"{row.name} failed: ", "red"), row.reason or "no reason given"))
    for name, budget in reply.devices.items():
        console.print(device_line(name, budget))


def ready_line(row: ModelRow) -> str:
    """``demo ready on cpu (rung cpu), 400.5 MiB measured, loaded in 3.2 s``."""
    devices = ", ".join(row.devices) or "no device"
    measured = [u.measured for u in row.devices.values() if u.measured is not None]
    if measured:
        size = f"{format_bytes(sum(measured))} measured"
    else:
        size = f"{format_bytes(sum(u.reserved_bytes for u in row.devices.values()))} reserved"
    took = f", loaded in {row.load_seconds:.1f} s" if row.load_seconds is not None else ""
    return f"{row.name} {row.state} on {devices} (rung {row.rung or '-'}), {size}{took}"


def _sizes(sizes: object) -> str:
    if not isinstance(sizes, dict) or not sizes:
        return "?"
    return ", ".join(f"{format_bytes(int(v))} on {d}" for d, v in sorted(sizes.items()) if isinstance(v, int | float))


def _seconds(value: object) -> str:
    return f"{value:.1f} s" if isinstance(value, int | float) else "?"


def _event(data: dict[str, Any]) -> PoolEvent:
    return PoolEvent.from_json(data)  # the caller checked seq, event and model: nothing left to raise


def progress_line(record: PoolEvent, model: str, reserved: dict[str, int] | None = None) -> str | None:
    """One event of the pool as a line about loading ``model``, or None when it is not about that load.

    ``reserved`` is what the load event reserved, so the ready line can set the measured bytes beside it.
    """
    kind, name, event = record.kind, record.model, record.fields
    reason = event.get("reason") or "no reason given"
    if kind == PoolEventKind.EVICT and name != model and str(event.get("reason", "")).endswith(f"for {model}"):
        return f"evicting {name} (to make room)"
    if name != model:
        return None
    if kind == PoolEventKind.LOAD:
        return f"loading {model} as {event.get('rung') or '?'}, reserving {_sizes(event.get('reserved_bytes'))}"
    if kind == PoolEventKind.PHASE:
        return f"{event.get('phase') or '?'} {_seconds(event.get('seconds'))}"
    if kind == PoolEventKind.READY:
        sizes = [f"measured {_sizes(event['measured_bytes'])}" if event.get("measured_bytes") else "not measured"]
        if reserved:
            sizes.append(f"reserved {_sizes(reserved)}")
        return f"ready in {_seconds(event.get('load_seconds'))} ({', '.join(sizes)})"
    if kind == PoolEventKind.RESERVE:
        return f"reserving {_sizes(event.get('reserved_bytes'))} instead: {reason}"
    if kind == PoolEventKind.RUNG_LOWER:
        return f"{event.get('failed_rung') or '?'} does not fit: {reason}; trying {event.get('rung') or '?'}"
    if kind == PoolEventKind.RETRY:
        return f"trying {event.get('rung') or '?'} again, reserving {_sizes(event.get('reserved_bytes'))}: {reason}"
    if kind == PoolEventKind.LEARNED:
        return f"learned: as {event.get('rung') or '?'} it needs {_sizes(event.get('next_reserved_bytes'))}"
    if kind == PoolEventKind.RESERVATION_CAPPED:
        return f"reserving all that is usable for {model}: {reason}"
    if kind == PoolEventKind.BACKOFF:
        return f"waiting {_seconds(event.get('seconds'))} before loading {model} again: it failed just before"
    if kind == PoolEventKind.RELOAD:
        return f"reloading {model}: {reason}"
    if kind == PoolEventKind.WATCHDOG_KILL:
        return f"the watchdog stopped {model}: {reason}"
    if kind == PoolEventKind.RETRY_LOWER:
        if event.get("rung"):
            return f"retrying as {event['rung']}, one rung below {event.get('failed_rung') or '?'}"
        return f"retrying one rung below {event.get('failed_rung') or '?'}"
    if kind == PoolEventKind.LOAD_FAILED:
        return f"load failed: {reason}"
    if kind == PoolEventKind.REFUSED:
        return f"refused: {reason}"
    return None


class LoadProgress:
    """Polls ``/api/events`` in a thread while ``POST /api/load`` waits, and shows that load's events.

    Progress is best effort: a server without ``/api/events`` (or one that stops answering it) only
    ends the progress lines; the load's own answer still says how it went. Lines go to stderr: as plain
    lines when it is not a terminal, above a spinner naming the current step when it is.
    """

    def __init__(self, client: GatewayClient, model: str, console: Console) -> None:
        self.client, self.model, self.console = client, model, console
        self.lines: list[str] = []
        self._reserved: dict[str, int] | None = None
        self._stop = threading.Event()
        self._since: int | None = None
        self._status: Any = None
        self._thread = threading.Thread(target=self._run, name=f"load-progress-{model}", daemon=True)

    def __enter__(self) -> LoadProgress:
        try:
            self._since = max((e.seq for e in self.client.events()), default=0)
        except MemserveError:
            self._since = None  # no progress to show from this server
        if self.console.is_terminal:
            self._status = self.console.status(f"loading {self.model} on {self.client.base_url} ...")
            self._status.start()
        if self._since is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._status is not None:
            self._status.stop()

    def _run(self) -> None:
        while self._poll():
            if self._stop.wait(PROGRESS_POLL_SECONDS):
                self._poll()  # the load has answered: one more poll catches its last events
                return

    def _poll(self) -> bool:
        assert self._since is not None
        try:
            events = self.client.events(self._since)
        except MemserveError:
            return False
        for event in events:
            self._since = max(self._since, event.seq)
            reserving = (PoolEventKind.LOAD, PoolEventKind.RESERVE, PoolEventKind.RETRY)
            if event.kind in reserving and event.model == self.model:
                reserved = event.fields.get("reserved_bytes")
                self._reserved = reserved if isinstance(reserved, dict) else None
            line = progress_line(event, self.model, self._reserved)
            if line is not None:
                self._show(line)
        return True

    def _show(self, line: str) -> None:
        self.lines.append(line)
        if self._status is None:
            click.echo(line, err=True)
            return
        self.console.print(line, markup=False, highlight=False)
        self._status.update(f"loading {self.model}: {line}")


# --- the commands -------------------------------------------------------------------------------------------


def server_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option("--json", "as_json", is_flag=True, help="Print the server's JSON as-is.")(command)
    return click.option(
        "--url",
        envvar="MEMSERVE_URL",
        default=DEFAULT_URL,
        show_default=True,
        show_envvar=True,
        help="Base URL of the memserve server.",
    )(command)


def echo_json(data: dict[str, Any]) -> None:
    click.echo(json.dumps(data, indent=2))


def stdout_console() -> Console:
    """Rich's console, but piped output is not wrapped at 80 columns, so ``memserve ps | grep`` sees whole rows."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


@click.command("ps")
@server_options
def ps(url: str, as_json: bool) -> None:
    """Show the models a running memserve server holds, and each device's memory."""
    with GatewayClient(url) as client:
        data = client.ps()
    if as_json:
        echo_json(data)
        return
    render_ps(parse_reply(PsReply, data, "GET /api/ps"), stdout_console(), now_seconds=time.time())


@click.command("load")
@click.argument("name")
@click.option(
    "--keep-alive",
    default=None,
    help="How long to keep NAME loaded once idle, e.g. 10m, 1h, or -1 for ever (server default if unset).",
)
@server_options
def load(name: str, keep_alive: str | None, url: str, as_json: bool) -> None:
    """Load model NAME on a running memserve server and wait until it is ready (can take minutes).

    While it waits, each step of the load (evictions made for it, phases, ready or why not) is a line on stderr.
    """
    with GatewayClient(url) as client, GatewayClient(url) as poller, LoadProgress(poller, name, Console(stderr=True)):
        data = client.load(name, keep_alive=keep_alive)
    if as_json:
        echo_json(data)
        return
    row = parse_reply(LoadReply, data, "POST /api/load").model
    if row.state == ModelState.FAILED:
        raise RunnerFailed(f"{row.name} failed to load: {row.reason or 'no reason given'}")
    click.echo(ready_line(row))


@click.command("unload")
@click.argument("name")
@server_options
def unload(name: str, url: str, as_json: bool) -> None:
    """Unload model NAME from a running memserve server, once its in-flight requests finish."""
    with GatewayClient(url) as client:
        data = client.unload(name)
    if as_json:
        echo_json(data)
        return
    reply = parse_reply(UnloadReply, data, "POST /api/unload")
    click.echo(f"unloaded {reply.model}" if reply.unloaded else f"{reply.model} was not loaded")


__all__ = [
    "DEFAULT_URL",
    "DeviceBudget",
    "DeviceUse",
    "GatewayClient",
    "LoadReply",
    "ModelRow",
    "PsReply",
    "UnloadReply",
    "load",
    "ps",
    "unload",
]
