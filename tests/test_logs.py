"""The log: text for a person, one JSON object per line for a collector, the same lines either way."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from memserve.logs import FIELDS, JsonFormatter, configure
from tests.serving import free_port, wait_until_healthy


def test_a_json_line_has_time_level_logger_message_and_the_fields() -> None:
    record = logging.LogRecord("memserve.gateway", logging.INFO, __file__, 1, "POST %s", ("/chat/completions",), None)
    record.fields = {"model": "demo", "status": 200, "message": "not over the message", "ttft_seconds": None}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "POST /chat/completions"  # a field never replaces the line's own keys
    assert (line["level"], line["logger"], line["model"], line["status"]) == ("info", "memserve.gateway", "demo", 200)
    assert line["ttft_seconds"] is None
    assert line["time"].endswith("Z") and "T" in line["time"]


def test_a_json_line_carries_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("memserve", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in line["exception"]


def test_configure_twice_keeps_one_handler_in_the_last_format(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    for name in ("memserve", "uvicorn"):  # leave the loggers as they were for the other tests
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))
        monkeypatch.setattr(logger, "level", logger.level)
        monkeypatch.setattr(logger, "propagate", logger.propagate)
    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):  # configure() turns them off
        monkeypatch.setattr(logging, name, getattr(logging, name))
    configure("info")
    configure("info", "json")
    logging.getLogger("memserve.pool").info("evict demo", extra={FIELDS: {"event": "evict", "model": "demo"}})
    logging.getLogger("uvicorn.error").info("not shown: uvicorn speaks from warnings up")
    logging.getLogger("uvicorn.error").warning("shown")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["message"], line.get("event")) for line in lines] == [("evict demo", "evict"), ("shown", None)]


def test_a_gateway_with_json_logs_writes_only_json_lines_with_each_events_fields(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MEMSERVE_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "memserve", "serve", "--model", f"demo={tiny_model_dir}", "--port", str(port)]
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*command, "--log-format", "json"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until_healthy(origin, proc, log=log_path)
        assert httpx.post(f"{origin}/api/load", json={"model": "demo"}, timeout=120).status_code == 200
        chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{origin}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]  # every line is JSON
    events = {line.get("event"): line for line in lines if line["logger"] == "memserve.pool"}
    assert {"load", "ready", "stopped"} <= set(events)
    assert events["load"]["model"] == "demo" and events["load"]["rung"] == "cpu"
    assert events["ready"]["load_seconds"] > 0 and events["ready"]["message"].startswith("ready demo")
    (request,) = [line for line in lines if line["message"].startswith("POST /v1/chat/completions")]
    assert request["logger"] == "memserve.gateway.app" and request["endpoint"] == "/v1/chat/completions"
    assert (request["model"], request["status"], request["completion_tokens"]) == ("demo", 200, 2)
    assert request["prompt_tokens"] > 0 and request["duration_seconds"] > 0
    assert request["key"] is None and request["ttft_seconds"] is None and request["error_type"] is None  # whole
