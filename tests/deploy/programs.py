"""What the deploy tests share: finding Debian's programs (skip on a developer machine, fail under CI), rendering
a template the way the nginx image does, and waiting for a port.

The programs are real (nginx, prometheus, promtool from Debian's packages; ``.ci/run`` installs them), started
as foreground processes whose pid, temp and data files live in the test's tmp_path, on free 127.0.0.1 ports.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def program(name: str, package: str) -> str:
    """The path of ``name`` (on PATH or in /usr/sbin, where Debian puts nginx); skip without it, fail under CI."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found:
        return found
    message = f"{name} is not installed: install Debian's {package} package (apt-get install {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run this test (.ci/run installs it)")
    pytest.skip(message)


_NAME = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def envsubst(template: str, values: Mapping[str, str]) -> str:
    """``envsubst '$A $B'``: replace ``$NAME`` and ``${NAME}`` for the given names only and leave every other
    ``$`` (nginx's own lower-case variables) as it is, as the nginx image runs envsubst. An upper-case name left
    over is one the test forgot: an error here, where envsubst would leave it in and nginx fail on it later."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values[name] if name in values else match.group(0)

    rendered = _NAME.sub(one, template)
    left = sorted({name for m in _NAME.finditer(rendered) if (name := m.group(1) or m.group(2)).isupper()})
    assert not left, f"the template uses {left}, which the test did not set"
    return rendered


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Until something accepts on 127.0.0.1:``port`` (up to 60 s); fail with the log if ``process`` exits."""
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        alive = process.poll() is None and time.monotonic() < deadline
        assert alive, f"{what} did not start (exit status {process.poll()}): {log.read_text()[-3000:]}"
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], what: str) -> None:
    """SIGTERM, and check it exited (a stuck process is a failure, then killed)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"{what} did not exit within 30 s of SIGTERM")
