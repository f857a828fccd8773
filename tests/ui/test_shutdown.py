"""An open ``/ui`` tab does not hold ``memserve serve``'s shutdown: its event stream ends cleanly at SIGTERM.

uvicorn lets open responses finish before it stops, for up to 30 s, then cancels them; an event stream never
finishes by itself, so without ``close_live_streams`` a SIGTERM waits the whole 30 s and cuts the stream off.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.serving import free_port, wait_until_healthy


def test_sigterm_ends_an_open_event_stream_cleanly(tmp_path: Path) -> None:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MEMSERVE_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "memserve", "serve", "--port", str(port), "--log-level", "warning"]
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until_healthy(origin, proc, log=log_path)
        with httpx.stream("GET", f"{origin}/api/events/stream", timeout=60) as response:
            assert response.status_code == 200
            proc.send_signal(signal.SIGTERM)
            # the response ends whole, its last chunk sent (a cut connection raises RemoteProtocolError)
            assert [line for line in response.iter_lines() if line and not line.startswith(":")] == []
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "graceful shutdown exceeded" not in log_path.read_text()
