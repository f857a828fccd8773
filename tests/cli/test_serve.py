"""``memserve serve`` before it loads anything: the bind check, the port, the configured sources."""

from __future__ import annotations

import errno
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from memserve.cli import main
from memserve.cli.serve import EXIT_CANNOT_LISTEN, is_loopback
from memserve.net import bind_error_message, listening_sockets

serve_module = importlib.import_module("memserve.cli.serve")  # the package's ``serve`` is the command


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.4", False),
        ("example.com", False),
    ],
)
def test_only_loopback_binds_are_quiet(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another server is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Fail the test if serve builds a pool (a model could load) or starts serving; no hub, no stray data."""
    ran: list[str] = []

    def no_pool(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("serve built its pool")

    def run(settings: Any, sockets: list[socket.socket]) -> bool:
        ran.append("run")
        return True

    monkeypatch.setattr("memserve.pool.pool.ModelPool", no_pool)
    monkeypatch.setattr(serve_module, "_run", run)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEMSERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MEMSERVE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return ran


def test_a_port_in_use_is_its_own_exit_status_before_anything_is_checked(
    held_port: int, nothing_runs: list[str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(main, ["serve", "--port", str(held_port), "--model", f"m={tmp_path / 'nope'}"])
    assert result.exit_code == EXIT_CANNOT_LISTEN == 4, result.output
    assert f"error: cannot listen on 127.0.0.1:{held_port}: the port is in use" in result.output
    assert "--port 0 picks one" in result.output
    assert "nope" not in result.output and nothing_runs == []  # the port is found first


def test_a_mistyped_source_stops_serve_naming_the_model_and_the_nearest_name(
    tiny_model_dir: Path, nothing_runs: list[str], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(tiny_model_dir, models / "demo-tiny")
    result = CliRunner().invoke(
        main,
        [
            "serve",
            "--port",
            "0",
            "--model",
            f"good={models / 'demo-tiny'}",
            "--model",
            "typo=models/demo-tinyy",
            "--model",
            "empty=models",
        ],
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: model")]
    assert len(lines) == 2, result.output  # every bad one, not only the first
    assert lines[0].startswith("error: model 'typo': models/demo-tinyy: no such folder")
    assert "nearest existing name: models/demo-tiny" in lines[0]
    assert lines[1].startswith("error: model 'empty': ") and "config.json" in lines[1]  # not a checkpoint
    assert "good" not in result.output and nothing_runs == []


def test_a_hub_id_is_reported_not_fetched_and_the_bound_port_is_released(
    tiny_model_dir: Path, nothing_runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    def run(settings: Any, sockets: list[socket.socket]) -> bool:
        seen.extend(sock.getsockname()[1] for sock in sockets)
        return True

    monkeypatch.setattr(serve_module, "_run", run)
    result = CliRunner().invoke(
        main, ["serve", "--port", "0", "--model", f"local={tiny_model_dir}", "--model", "remote=org/some-model"]
    )
    assert result.exit_code == 0, result.output
    assert "warning: model 'remote' (org/some-model): not in the local Hugging Face cache" in result.output
    assert seen and seen[0] != 0
    with socket.socket() as again:  # serve closed its sockets on the way out
        again.bind(("127.0.0.1", seen[0]))


def test_listening_sockets_share_one_port_and_say_why_they_cannot(held_port: int) -> None:
    sockets = listening_sockets("localhost", 0)
    try:
        assert len({sock.getsockname()[1] for sock in sockets}) == 1
    finally:
        for sock in sockets:
            sock.close()
    with pytest.raises(OSError) as raised:
        listening_sockets("127.0.0.1", held_port)
    assert raised.value.errno == errno.EADDRINUSE
    assert bind_error_message("127.0.0.1", 80, OSError(errno.EACCES, "Permission denied")).startswith(
        "cannot listen on 127.0.0.1:80: permission denied"
    )
    with pytest.raises(OSError) as unknown:
        listening_sockets("no-such-host.invalid", 0)
    assert "is not a name or address of this machine" in bind_error_message("no-such-host.invalid", 0, unknown.value)


def test_serve_listens_on_the_socket_it_bound_and_stops_cleanly(tmp_path: Path) -> None:
    """A real gateway (no models): port 0 is reported as the port it got; SIGTERM ends it after a graceful stop."""
    env = {**os.environ, "MEMSERVE_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    env.pop("MEMSERVE_CONFIG", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "memserve", "serve", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        found = re.search(r"memserve gateway on http://127\.0\.0\.1:(\d+) ", line)
        assert found, line
        assert found.group(1) != "0"
        assert line.rstrip().endswith("auth: off"), line  # loopback: off by default, and the line says so
        # the socket listens from the start: this waits in its backlog until uvicorn accepts it
        assert httpx.get(f"http://127.0.0.1:{found.group(1)}/health", timeout=60).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM  # uvicorn stops gracefully, then re-raises the signal
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
