"""The torture test of issue 11: three models under a budget that holds one, 200 mixed requests, two runner kills.

A real gateway (``memserve serve`` as a subprocess, real runner processes) serves three distinct tiny demo
checkpoints under a ``--memory`` budget computed from ``memserve fit --json``: one plan fits, two never do.
The module fixture runs the torture once and records everything; each test asserts one requirement of the
issue on that record. In order:

1. **kill -9**: a first gateway with one preloaded model gets ``kill -9``; its runner must be gone within a
   second (polled for ``GONE_DEADLINE_SECONDS``), and the torture gateway, starting next, must remove its
   run folder.
2. **door**: with ``a`` loaded and idle, every kind of bad input is sent for ``c`` (not loaded). None may
   load ``c`` or evict ``a``: bad input is answered at the door, before any lease, load or eviction.
3. **mix**: 200 requests, about 12 in flight, in three blocks (``a``, ``b``, ``c``: the budget forces a swap
   at each): streamed and not, chat and text; 10% clients that hang up mid-stream; 10% bad inputs (for any
   model); ``kill -9`` of the busy runner of ``b`` and later of ``c`` (``KILL_AT``). A poller reads
   ``/api/ps`` every 100 ms for the reserved bytes.
4. **after**: every model answers a normal request; then SIGTERM must leave no runner behind.

Everything random is seeded; the only deadlines are "gone within a second"-style checks, polled for
``GONE_DEADLINE_SECONDS`` so a busy machine does not fail them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from click.testing import CliRunner

from memserve.checkpoint.demo import write_demo_model
from memserve.cli import main
from tests.serving import free_port

MiB = 1 << 20
HEADROOM_BYTES = 64 * MiB
CONTEXT_TOKENS = 512
CONCURRENCY = 4
MODELS = ("a", "b", "c")
BLOCKS = ("a", "b", "c")  # a third of the requests each: the budget holds one model, so each block swaps
REQUESTS = 200
IN_FLIGHT = 12
KILL_AT = {100: "b", 170: "c"}  # at these requests, kill -9 the runner of that block's model once it serves
SEED = 11
REQUEST_TIMEOUT_SECONDS = 300.0
START_TIMEOUT_SECONDS = 120.0
GONE_DEADLINE_SECONDS = 5.0  # the issue says "within a second"; polled generously for a busy CI machine
WORDS = (
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "warm",
    "mat",
    "and",
    "told",
    "the",
    "sea",
    "a",
    "long",
    "story",
    "about",
    "stars",
    "rivers",
    "and",
    "old",
    "ships",
)

BAD_KINDS = (
    "invalid_json",
    "json_too_deep",
    "json_integer_too_long",
    "lone_surrogate",
    "temperature_hot",
    "max_tokens_negative",
    "stream_string",
    "stream_int",
    "body_5mb",
    "prompt_1mib",
    "max_tokens_past_context",
    "unknown_field",
    "empty_messages",
    "messages_not_a_list",
    "missing_model",
    "model_dotdot",
    "model_newline",
    "form_urlencoded",
    "load_negative_concurrency",
    "fit_local_path",
    "fit_dotdot",
)
"""Every kind of bad input the issue lists. ``unknown_field`` is the one a server may also accept: the
runner's schema ignores fields it does not know (clients send many), so only a 5xx would be wrong there."""

EXPECTED_STATUS: dict[str, set[int]] = {
    "invalid_json": {400},
    "json_too_deep": {400},
    "json_integer_too_long": {400},
    "lone_surrogate": {400},
    "temperature_hot": {400},
    "max_tokens_negative": {400},
    "stream_string": {400},
    "stream_int": {400},
    "body_5mb": {400, 413},
    "prompt_1mib": {400, 413},
    "max_tokens_past_context": {400},
    "unknown_field": {200, 400},
    "empty_messages": {400},
    "messages_not_a_list": {400},
    "missing_model": {400},
    "model_dotdot": {400, 404},
    "model_newline": {400, 404},
    "form_urlencoded": {415},
    "load_negative_concurrency": {400},
    "fit_local_path": {400, 404},
    "fit_dotdot": {400, 404},
}
"""What the issue says each bad input gets: 400 (415 for a JSON body sent as a form), a 404 for a name the
server does not serve, and never a model load."""


# --- the record ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one request ended. ``problem`` is set when it ended neither complete nor in a clean error."""

    index: int
    kind: str
    model: str
    bad: bool
    status: int | None = None
    complete: bool = False
    error: dict[str, Any] | None = None
    problem: str | None = None
    seconds: float = 0.0
    started_at: float = 0.0  # time.monotonic() when it was sent

    def brief(self) -> str:
        what = self.problem or (self.error or {}).get("message", "")
        return f"#{self.index} {self.kind} {self.model!r} -> {self.status}: {str(what)[:300]}"


@dataclass
class Gateway:
    """One ``memserve serve`` subprocess and where it listens."""

    process: subprocess.Popen[bytes]
    origin: str
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Record:
    """Everything the torture saw; each test reads one part of it."""

    usable_bytes: int = 0
    plans_bytes: dict[str, int] = field(default_factory=dict)
    door: list[Outcome] = field(default_factory=list)
    door_events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[tuple[int, int]] = field(default_factory=list)  # (sum of reserved bytes, usable bytes)
    sample_errors: list[str] = field(default_factory=list)
    kills: list[tuple[str, int, float]] = field(default_factory=list)  # (model, pid, time.monotonic())
    kill_problems: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    after: dict[str, Outcome] = field(default_factory=dict)
    sigterm_exit: int | None = None
    sigterm_left: list[str] = field(default_factory=list)
    sigterm_runners: int = 0
    kill9_runners: list[int] = field(default_factory=list)
    kill9_left: list[str] = field(default_factory=list)
    kill9_gone_seconds: float | None = None
    dead_run_dir: str | None = None
    dead_run_dir_left: bool | None = None
    failures: list[str] = field(default_factory=list)  # a phase that could not run at all
    logs: dict[str, str] = field(default_factory=dict)

    def context(self) -> str:
        return "\n".join([*self.failures, *(f"--- {name} log tail ---\n{tail}" for name, tail in self.logs.items())])


# --- checking answers ------------------------------------------------------------------------------------


def error_problem(body: Any) -> str | None:
    """None when ``body`` is a clean OpenAI error (``{"error": {message, type, param, code}}``), else what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return f"not an OpenAI error body: {str(body)[:200]!r}"
    error = body["error"]
    missing = {"message", "type", "param", "code"} - set(error)
    if missing:
        return f"error body lacks {sorted(missing)}: {error}"
    if not isinstance(error["message"], str) or not error["message"].strip():
        return f"error message is not a non-empty string: {error}"
    if not isinstance(error["type"], str):
        return f"error type is not a string: {error}"
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return f"error param/code is neither a string nor null: {error}"
    return None


def check_json_answer(outcome: Outcome, response: httpx.Response, *, text: bool) -> None:
    """A non-streamed answer: a whole completion on 200, a clean OpenAI error otherwise."""
    outcome.status = response.status_code
    try:
        body = response.json()
    except ValueError:
        outcome.problem = f"HTTP {response.status_code} with a body that is not JSON: {response.text[:200]!r}"
        return
    if response.status_code != 200:
        outcome.problem = error_problem(body)
        outcome.error = body.get("error") if isinstance(body, dict) else None
        return
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices or choices[0].get("finish_reason") not in ("stop", "length") or "usage" not in body:
        outcome.problem = f"200 without a whole completion: {str(body)[:300]}"
        return
    content = choices[0].get("text") if text else (choices[0].get("message") or {}).get("content")
    if not isinstance(content, str):
        outcome.problem = f"200 without text in the choice: {choices[0]}"
        return
    outcome.complete = True


def check_stream(outcome: Outcome, lines: list[str], *, hung_up: bool) -> None:
    """A 200 event stream: ``data:`` lines of JSON, a finish_reason, ``[DONE]``; or a clean error event then
    ``[DONE]``. A client that hung up only checks what it read."""
    events = [line for line in lines if line]
    for line in events:
        if not line.startswith("data: "):
            outcome.problem = f"a stream line that is not SSE data: {line[:200]!r}"
            return
    done = bool(events) and events[-1] == "data: [DONE]"
    chunks = []
    for line in events:
        if line == "data: [DONE]":
            continue
        try:
            chunks.append(json.loads(line[6:]))
        except ValueError:
            outcome.problem = f"a stream event that is not JSON: {line[:200]!r}"
            return
    errors = [c for c in chunks if isinstance(c, dict) and "error" in c]
    if errors:
        outcome.error = errors[0].get("error")
        outcome.problem = error_problem(errors[0])
        if outcome.problem is None and not done and not hung_up:
            outcome.problem = "an error event not followed by data: [DONE]"
        return
    if hung_up:
        outcome.complete = True  # what it read was well-formed; the rest it did not want
        return
    finished = any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks)
    if not done or not finished:
        outcome.problem = f"the stream ended without a finish_reason and [DONE]: last lines {events[-3:]}"
        return
    outcome.complete = True


# --- requests --------------------------------------------------------------------------------------------


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def normal_request(kind: str, model: str, rng: random.Random, index: int) -> tuple[str, dict[str, Any]]:
    """(path, body) of a well-formed request: ``chat``/``text``, ``stream_`` or not, or a ``hangup`` stream."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": rng.randint(4, 24),
        "seed": index,
        "temperature": rng.choice([0, 0.7]),
    }
    if kind == "hangup":
        body.update(stream=True, max_tokens=96)
    elif kind.startswith("stream_"):
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if kind.endswith("text"):
        return "/v1/completions", {**body, "prompt": words(rng, rng.randint(3, 30))}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": words(rng, rng.randint(3, 30))}]}


def bad_request(kind: str, model: str) -> dict[str, Any]:
    """httpx ``request`` arguments (method, url path and body) for one kind of bad input aimed at ``model``."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    post = {"method": "POST", "url": "/v1/chat/completions"}
    if kind == "invalid_json":
        return {**post, "content": b'{"model": "' + model.encode() + b'", "messages": [', "headers": _json}
    if kind == "json_too_deep":  # past the ~1,000 levels Python's json reads, in a field nobody reads
        deep = json.dumps({**chat, "extra": 0}).encode().replace(b"0}", b"[" * 5000 + b"]" * 5000 + b"}")
        return {**post, "content": deep, "headers": _json}
    if kind == "json_integer_too_long":
        long = (
            json.dumps({**chat, "max_tokens": 0}).encode().replace(b'"max_tokens": 0', b'"max_tokens": ' + b"9" * 5000)
        )
        return {**post, "content": long, "headers": _json}
    if kind == "lone_surrogate":  # JSON's grammar allows the escape; it is no Unicode text
        return {
            **post,
            "content": json.dumps({**chat, "messages": [{"role": "user", "content": "hi \ud800"}]}).encode(),
            "headers": _json,
        }
    if kind == "temperature_hot":
        return {**post, "json": {**chat, "temperature": "hot"}}
    if kind == "max_tokens_negative":
        return {**post, "json": {**chat, "max_tokens": -5}}
    if kind == "stream_string":
        return {**post, "json": {**chat, "stream": "true"}}
    if kind == "stream_int":
        return {**post, "json": {**chat, "stream": 1}}
    if kind == "body_5mb":
        return {**post, "json": {**chat, "messages": [{"role": "user", "content": "x " * (5 * 1000 * 1000 // 2)}]}}
    if kind == "prompt_1mib":
        text = " ".join(WORDS)
        prompt = (text + " ") * (MiB // (len(text) + 1) + 1)
        return {
            "method": "POST",
            "url": "/v1/completions",
            "json": {"model": model, "prompt": prompt[:MiB], "max_tokens": 8},
        }
    if kind == "max_tokens_past_context":
        return {**post, "json": {**chat, "max_tokens": 1_000_000}}
    if kind == "unknown_field":
        return {**post, "json": {**chat, "frobnicate": {"level": 11}}}
    if kind == "empty_messages":
        return {**post, "json": {**chat, "messages": []}}
    if kind == "messages_not_a_list":
        return {**post, "json": {**chat, "messages": "hello"}}
    if kind == "missing_model":
        return {**post, "json": {k: v for k, v in chat.items() if k != "model"}}
    if kind == "model_dotdot":
        return {**post, "json": {**chat, "model": f"../../{model}/../etc/passwd"}}
    if kind == "model_newline":
        return {**post, "json": {**chat, "model": f"{model}\nX-Injected: 1"}}
    if kind == "form_urlencoded":
        return {
            **post,
            "content": json.dumps(chat).encode(),
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        }
    if kind == "load_negative_concurrency":
        return {"method": "POST", "url": "/api/load", "json": {"model": model, "concurrency": -3}}
    if kind == "fit_local_path":
        return {"method": "GET", "url": "/api/fit", "params": {"model": "/etc"}}
    if kind == "fit_dotdot":
        return {"method": "GET", "url": "/api/fit", "params": {"model": "../../etc/passwd"}}
    raise AssertionError(f"unknown bad-input kind {kind}")


_json = {"content-type": "application/json"}


async def send(client: httpx.AsyncClient, index: int, kind: str, model: str, rng_seed: int) -> Outcome:
    """Send one request of the mix and judge how it ended; never raises."""
    bad = kind in BAD_KINDS
    outcome = Outcome(index, kind, model, bad)
    started = outcome.started_at = time.monotonic()
    try:
        if bad:
            response = await client.request(**bad_request(kind, model))
            outcome.status = response.status_code
            if response.status_code == 200:
                outcome.complete = True  # accepted (only unknown_field may be); judged by the status tests
            else:
                check_json_answer(outcome, response, text=False)
        else:
            path, body = normal_request(kind, model, random.Random(rng_seed), index)
            if body.get("stream"):
                await _stream(client, outcome, path, body, hang_up=kind == "hangup")
            else:
                check_json_answer(outcome, await client.post(path, json=body), text=path == "/v1/completions")
    except httpx.HTTPError as exc:
        outcome.problem = f"transport error {type(exc).__name__}: {exc}"
    outcome.seconds = time.monotonic() - started
    return outcome


async def _stream(
    client: httpx.AsyncClient, outcome: Outcome, path: str, body: dict[str, Any], *, hang_up: bool
) -> None:
    async with client.stream("POST", path, json=body) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            check_json_answer(outcome, response, text=False)
            return
        lines: list[str] = []
        async for line in response.aiter_lines():
            lines.append(line)
            if hang_up and sum(x.startswith("data: {") for x in lines) == 2:
                break  # hang up mid-stream: leaving the block closes the connection
        check_stream(outcome, lines, hung_up=hang_up)


# --- processes -------------------------------------------------------------------------------------------


def start_gateway(folder: Path, name: str, config: Path, memory_bytes: int) -> Gateway:
    """``memserve serve`` on a free port; another port is tried if the one picked was taken meanwhile."""
    env = {**os.environ, "MEMSERVE_DATA_DIR": str(folder / f"data-{name}")}
    for attempt in range(3):
        port = free_port()
        log_path = folder / f"{name}-{attempt}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "memserve",
                    "serve",
                    "--config",
                    str(config),
                    "--memory",
                    f"cpu={memory_bytes}",
                    "--headroom",
                    str(HEADROOM_BYTES),
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        gateway = Gateway(process, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{gateway.origin}/health", timeout=5).status_code == 200:
                    return gateway
            time.sleep(0.1)
        if process.poll() is None:
            stop(gateway)
            raise AssertionError(
                f"gateway {name} did not answer /health in {START_TIMEOUT_SECONDS:.0f} s:\n{gateway.log_tail()}"
            )
    raise AssertionError(f"gateway {name} exited at start three times:\n{gateway.log_tail()}")


def stop(gateway: Gateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.kill()
    gateway.process.wait()


def runner_processes(gateway_pid: int) -> list[psutil.Process]:
    """The live runner processes under ``gateway_pid``."""
    try:
        children = psutil.Process(gateway_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if _is_runner(p)]


def _is_runner(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE and "memserve.runner" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def alive(process: psutil.Process) -> bool:
    """Still running (not a zombie), and still the same process (the pid was not reused)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(processes: list[psutil.Process], deadline_seconds: float) -> tuple[list[psutil.Process], float]:
    """Poll until none of ``processes`` is alive or the deadline passes; (those still alive, seconds waited)."""
    started = time.monotonic()
    while True:
        left = [p for p in processes if alive(p)]
        waited = time.monotonic() - started
        if not left or waited > deadline_seconds:
            return left, waited
        time.sleep(0.02)


def describe(processes: list[psutil.Process]) -> list[str]:
    out = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            out.append(f"pid {p.pid} ppid {p.ppid()} {' '.join(p.cmdline())[:160]}")
    return out


def write_config(path: Path, models: dict[str, Path], *, preload: bool = False) -> Path:
    lines = ["memory_wait_seconds: 60s", "keep_alive: 10m", "models:"]
    for name, source in models.items():
        lines += [
            f"  - name: {name}",
            f"    source: {json.dumps(str(source))}",
            f"    context: {CONTEXT_TOKENS}",
            f"    concurrency: {CONCURRENCY}",
        ]
        if preload:
            lines.append("    preload: true")
    path.write_text("\n".join(lines) + "\n")
    return path


def planned_bytes(source: Path) -> int:
    """The cpu bytes ``memserve fit --json`` plans for ``source`` as the gateway will load it."""
    result = CliRunner().invoke(
        main, ["fit", str(source), "--json", "--context", str(CONTEXT_TOKENS), "--concurrency", str(CONCURRENCY)]
    )
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["plan"]["devices"]["cpu"]["total_bytes"])


# --- the torture -----------------------------------------------------------------------------------------


def mix(rng: random.Random) -> list[tuple[str, str]]:
    """(kind, model) of the 200 requests: 10% bad input, 10% hang-ups, the rest chat/text, streamed or not."""
    indices = list(range(REQUESTS))
    rng.shuffle(indices)
    bad = set(indices[: REQUESTS // 10])
    hangups = set(indices[REQUESTS // 10 : REQUESTS // 5])
    kinds = list(BAD_KINDS)
    rng.shuffle(kinds)
    bad_kinds = iter(kinds * 2)  # 20 bad inputs of the 21 kinds (the door check sends every kind once)
    out = []
    for i in range(REQUESTS):
        block_model = BLOCKS[i * len(BLOCKS) // REQUESTS]
        if i in bad:
            kind = next(bad_kinds)
            # a request the server may accept goes to the model being served, or it would force a swap
            out.append((kind, block_model if EXPECTED_STATUS[kind] & {200} else rng.choice(MODELS)))
        elif i in hangups:
            out.append(("hangup", block_model))
        else:
            out.append((rng.choice(["chat", "text", "stream_chat", "stream_text"]), block_model))
    return out


async def run_mix(origin: str, record: Record) -> None:
    rng = random.Random(SEED)
    plan = mix(rng)
    limits = httpx.Limits(max_connections=IN_FLIGHT + 8, max_keepalive_connections=IN_FLIGHT)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS, connect=10.0)
    stop_polling = asyncio.Event()
    pids: dict[int, str] = {}
    async with (
        httpx.AsyncClient(base_url=origin, limits=limits, timeout=timeout) as client,
        httpx.AsyncClient(base_url=origin, timeout=10.0) as poller,
    ):

        async def poll() -> None:
            while not stop_polling.is_set():
                try:
                    ps = (await poller.get("/api/ps")).json()
                    reserved = sum(row["devices"].get("cpu", {}).get("reserved_bytes", 0) for row in ps["models"])
                    record.samples.append((reserved, int(ps["devices"]["cpu"]["usable_bytes"])))
                    pids.update({row["pid"]: row["name"] for row in ps["models"] if row.get("pid")})
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    record.sample_errors.append(f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_polling.wait(), 0.1)

        async def kill_runner(model: str) -> None:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                rows = (await poller.get("/api/ps")).json()["models"]
                for row in rows:
                    if row["name"] == model and row["state"] == "ready" and row.get("pid") and row["leases"]:
                        with contextlib.suppress(psutil.Error):
                            if "memserve.runner" in " ".join(psutil.Process(row["pid"]).cmdline()):
                                os.kill(row["pid"], signal.SIGKILL)
                                record.kills.append((model, row["pid"], time.monotonic()))
                                return
                await asyncio.sleep(0.05)
            record.kill_problems.append(f"{model} had no busy ready runner to kill for {START_TIMEOUT_SECONDS:.0f} s")

        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(index: int, kind: str, model: str) -> Outcome:
            try:
                return await send(client, index, kind, model, SEED * 1000 + index)
            finally:
                slots.release()

        poll_task = asyncio.create_task(poll())
        tasks, side = [], []
        for index, (kind, model) in enumerate(plan):
            await slots.acquire()
            if index in KILL_AT:
                side.append(asyncio.create_task(kill_runner(KILL_AT[index])))
            tasks.append(asyncio.create_task(one(index, kind, model)))
        record.outcomes = list(await asyncio.gather(*tasks))
        await asyncio.gather(*side)
        stop_polling.set()
        await poll_task
    record.events = httpx.get(f"{origin}/api/events", timeout=10).json()["events"]


def door_check(origin: str, record: Record) -> None:
    """With ``a`` loaded and idle, each bad input for ``c`` (not loaded) must touch no model."""
    with httpx.Client(base_url=origin, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        loaded = client.post(
            "/v1/chat/completions",
            json={"model": "a", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert loaded.status_code == 200, loaded.text
        door_since = max((e["seq"] for e in client.get("/api/events").json()["events"]), default=0)
        for kind in BAD_KINDS:
            if kind == "unknown_field":
                continue  # may legitimately be served (and so load c)
            since = max((e["seq"] for e in client.get("/api/events").json()["events"]), default=0)
            outcome = Outcome(-1, kind, "c", bad=True)
            started = time.monotonic()
            try:
                response = client.request(**bad_request(kind, "c"))
                outcome.status = response.status_code
                if response.status_code != 200:
                    check_json_answer(outcome, response, text=False)
            except httpx.HTTPError as exc:
                outcome.problem = f"transport error {type(exc).__name__}: {exc}"
            outcome.seconds = time.monotonic() - started
            record.door.append(outcome)
            events = [
                e
                for e in client.get("/api/events", params={"since": since}).json()["events"]
                if e["model"] == "c" or e["event"] == "evict"
            ]
            record.door_events[kind] = events
            if any(e["model"] == "c" for e in events):
                client.post("/api/unload", json={"model": "c"})  # put it back as it was for the next kind
        # and anything that came late, after its own kind was checked
        seen = {e["seq"] for events in record.door_events.values() for e in events}
        late = [
            e
            for e in client.get("/api/events", params={"since": door_since}).json()["events"]
            if (e["model"] == "c" or e["event"] == "evict") and e["seq"] not in seen
        ]
        if late:
            record.door_events["(late)"] = late


def after_checks(origin: str, record: Record) -> None:
    with httpx.Client(base_url=origin, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        for model in (BLOCKS[-1], *(m for m in MODELS if m != BLOCKS[-1])):  # the loaded one first
            outcome = Outcome(-1, "after", model, bad=False)
            started = time.monotonic()
            try:
                response = client.post(
                    "/v1/chat/completions",
                    json={
                        "model": model,
                        "max_tokens": 4,
                        "messages": [{"role": "user", "content": "after the storm"}],
                    },
                )
                check_json_answer(outcome, response, text=False)
            except httpx.HTTPError as exc:
                outcome.problem = f"transport error {type(exc).__name__}: {exc}"
            outcome.seconds = time.monotonic() - started
            record.after[model] = outcome


def sigterm_check(gateway: Gateway, record: Record) -> None:
    runners = runner_processes(gateway.process.pid)
    record.sigterm_runners = len(runners)
    gateway.process.send_signal(signal.SIGTERM)
    try:
        record.sigterm_exit = gateway.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        record.failures.append("the gateway did not exit within 90 s of SIGTERM")
        stop(gateway)
    left, _ = wait_gone(runners, GONE_DEADLINE_SECONDS)
    record.sigterm_left = describe(left)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()


def kill9_check(folder: Path, source: Path, memory_bytes: int, record: Record) -> None:
    """A gateway with one preloaded model gets kill -9; its runner must follow it."""
    doomed = start_gateway(
        folder, "doomed", write_config(folder / "doomed.yaml", {"k": source}, preload=True), memory_bytes
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = httpx.get(f"{doomed.origin}/api/ps", timeout=10).json()["models"]
            if rows and rows[0]["state"] in ("ready", "failed"):
                break
            time.sleep(0.1)
        assert rows and rows[0]["state"] == "ready", f"the preload: {rows}\n{doomed.log_tail()}"
        socket_path = rows[0].get("socket")
        record.dead_run_dir = str(Path(socket_path).parent) if socket_path else None
        runners = runner_processes(doomed.process.pid)
        record.kill9_runners = [p.pid for p in runners]
        doomed.process.kill()
        doomed.process.wait()
        left, waited = wait_gone(runners, GONE_DEADLINE_SECONDS)
        record.kill9_gone_seconds = None if left else waited
        record.kill9_left = describe(left)
        for process in left:  # the check failed: do not leave them running
            with contextlib.suppress(psutil.Error):
                process.kill()
    finally:
        stop(doomed)
        record.logs["kill -9 gateway"] = doomed.log_tail(1500)


@pytest.fixture(scope="module")
def torture(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_qwen_dir: Path) -> Iterator[Record]:
    folder = tmp_path_factory.mktemp("torture")
    seed7 = write_demo_model(folder / "tiny-llama-seed7", size="tiny", arch="llama", seed=7).path
    sources = {"a": tiny_model_dir, "b": tiny_qwen_dir, "c": seed7}  # three distinct checkpoints
    record = Record(plans_bytes={name: planned_bytes(path) for name, path in sources.items()})
    # one plan fits (with room for a measured peak above the estimate), two never do
    record.usable_bytes = int(1.5 * max(record.plans_bytes.values()))
    assert record.usable_bytes < 2 * min(record.plans_bytes.values())
    memory_bytes = record.usable_bytes + HEADROOM_BYTES

    started = time.monotonic()
    try:
        kill9_check(folder, sources["a"], memory_bytes, record)
    except Exception as exc:
        record.failures.append(f"the kill -9 phase failed: {type(exc).__name__}: {exc}")
    record.phase_seconds["kill9"] = round(time.monotonic() - started, 1)

    gateway = start_gateway(folder, "torture", write_config(folder / "memserve.yaml", sources), memory_bytes)
    if record.dead_run_dir is not None:  # a gateway starting up removes the run folders of dead ones
        record.dead_run_dir_left = Path(record.dead_run_dir).exists()
        shutil.rmtree(record.dead_run_dir, ignore_errors=True)  # recorded; leave no litter behind
    try:
        phases = {
            "door": lambda: door_check(gateway.origin, record),
            "mix": lambda: asyncio.run(run_mix(gateway.origin, record)),
            "after": lambda: after_checks(gateway.origin, record),
            "sigterm": lambda: sigterm_check(gateway, record),
        }
        for name, phase in phases.items():
            started = time.monotonic()
            try:
                phase()
            except Exception as exc:  # record it: each test then says what it could not check
                record.failures.append(f"the {name} phase failed: {type(exc).__name__}: {exc}")
            record.phase_seconds[name] = round(time.monotonic() - started, 1)
    finally:
        stop(gateway)
        record.logs["torture gateway"] = gateway.log_tail()
    dump = os.environ.get("MEMSERVE_TORTURE_RECORD")  # a path: the whole record as JSON, to study a run
    if dump:
        Path(dump).write_text(json.dumps(dataclasses.asdict(record), indent=1, default=str))
    yield record


# --- the requirements ------------------------------------------------------------------------------------


def test_the_torture_really_ran(torture: Record) -> None:
    """Guards the other tests: 200 requests went out, the budget forced swaps and both kills happened."""
    assert not torture.failures, torture.context()
    assert len(torture.outcomes) == REQUESTS
    assert sum(o.bad for o in torture.outcomes) == REQUESTS // 10
    assert sum(o.kind == "hangup" for o in torture.outcomes) == REQUESTS // 10
    assert len(torture.kills) == len(KILL_AT), torture.kill_problems
    assert {o.model for o in torture.outcomes if not o.bad} == set(MODELS)
    assert any(e["event"] == "evict" for e in torture.events), "the budget forced no swap"
    assert len(torture.samples) >= 10, torture.sample_errors[:5]


def test_every_request_ends_complete_or_with_a_clean_openai_error(torture: Record) -> None:
    unclean = [o.brief() for o in torture.outcomes + torture.door if o.problem]
    assert not unclean, f"{len(unclean)} requests ended badly:\n" + "\n".join(unclean)


def test_no_bad_input_gets_a_5xx(torture: Record) -> None:
    bad = [o for o in torture.outcomes + torture.door if o.bad]
    five = [o.brief() for o in bad if o.status is None or o.status >= 500]
    assert not five, f"{len(five)} of {len(bad)} bad inputs got a 5xx or no answer:\n" + "\n".join(five)


def test_bad_inputs_get_the_status_the_issue_names(torture: Record) -> None:
    wrong = [
        f"{o.brief()} (expected {sorted(EXPECTED_STATUS[o.kind])})"
        for o in torture.door
        if o.status not in EXPECTED_STATUS[o.kind]
    ]
    assert not wrong, "\n".join(wrong)


def test_max_tokens_past_the_context_names_both_numbers(torture: Record) -> None:
    outcome = next(o for o in torture.door if o.kind == "max_tokens_past_context")
    message = (outcome.error or {}).get("message", "")
    assert outcome.status == 400 and "1000000" in message and str(CONTEXT_TOKENS) in message, outcome.brief()


def test_bad_input_for_an_unloaded_model_loads_and_evicts_nothing(torture: Record) -> None:
    assert torture.door, torture.context()
    touched = {
        kind: [f"{e['event']} {e['model']}" for e in events] for kind, events in torture.door_events.items() if events
    }
    assert not touched, f"bad input for the unloaded model c caused: {touched}"


def test_a_killed_runner_is_not_an_outage(torture: Record) -> None:
    """After each kill -9, a later request for that model was answered whole: the next request reloads it."""
    assert torture.kills, torture.kill_problems
    for model, pid, killed_at in torture.kills:
        later = [o for o in torture.outcomes if o.model == model and not o.bad and o.started_at > killed_at]
        assert later, f"no request for {model} was sent after its runner (pid {pid}) was killed"
        assert any(o.complete and o.status == 200 for o in later), (
            f"no request for {model} sent after the kill of pid {pid} succeeded:\n"
            + "\n".join(o.brief() for o in later[:10])
        )


def test_reserved_memory_never_goes_over_the_budget(torture: Record) -> None:
    assert torture.samples, torture.sample_errors[:5]
    over = [(reserved, usable) for reserved, usable in torture.samples if reserved > usable]
    assert not over, f"{len(over)} of {len(torture.samples)} samples over the budget, first {over[:3]}"


def test_every_model_answers_after_the_run(torture: Record) -> None:
    assert set(torture.after) == set(MODELS), torture.context()
    broken = [o.brief() for o in torture.after.values() if not o.complete]
    assert not broken, "\n".join(broken)


def test_sigterm_leaves_no_process_behind(torture: Record) -> None:
    assert torture.sigterm_runners >= 1, "no runner was alive at SIGTERM, so the check proves nothing"
    assert torture.sigterm_exit in (0, -signal.SIGTERM), torture.context()
    assert not torture.sigterm_left, torture.sigterm_left


def test_kill_9_of_the_gateway_takes_its_runners_within_a_second(torture: Record) -> None:
    assert torture.kill9_runners, torture.context()
    assert not torture.kill9_left, (
        f"{torture.kill9_left} still alive {GONE_DEADLINE_SECONDS:.0f} s after kill -9 of their gateway"
    )


def test_a_new_gateway_removes_the_run_folder_of_a_dead_one(torture: Record) -> None:
    if torture.dead_run_dir is None:
        pytest.skip("runners listen on TCP here: no run folder to clean")
    assert torture.dead_run_dir_left is False, f"{torture.dead_run_dir} is still there"
