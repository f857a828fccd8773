"""Small helpers the store tests share."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite  # noqa: F401  imported here, as root, before any test drops privileges
import asyncpg  # noqa: F401

from memserve.store import UsageRow

T0 = datetime(2026, 3, 14, 23, 59, 0, tzinfo=UTC)


@contextmanager
def unprivileged() -> Iterator[None]:
    """Run the block as ``nobody`` when the tests run as root (root ignores file modes); else as is.

    Only the effective ids change (glibc applies them to every thread, aiosqlite's included), so the
    block can hand root back at its end.
    """
    if os.geteuid() != 0:
        yield
        return
    nobody = pwd.getpwnam("nobody")
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def row(
    *,
    time: datetime = T0,
    key_id: str | None = "k1",
    key_name: str | None = "alice",
    end_user: str | None = None,
    model: str = "demo",
    prompt_tokens: int = 10,
    completion_tokens: int = 5,
    status: int = 200,
    ttft_seconds: float | None = 0.1,
    duration_seconds: float = 1.0,
    provider: str = "local",
    error_type: str | None = None,
) -> UsageRow:
    return UsageRow(
        time=time,
        key_id=key_id,
        key_name=key_name,
        end_user=end_user,
        model=model,
        provider=provider,
        endpoint="/v1/chat/completions",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        ttft_seconds=ttft_seconds,
        duration_seconds=duration_seconds,
        status=status,
        error_type=error_type,
    )


HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=" + sys.argv[2])
conn.execute("CREATE TABLE IF NOT EXISTS held (x)")
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO held VALUES (1)")
print("locked", flush=True)
sys.stdin.read()
conn.rollback()
"""


class LockHolder:
    """Another process holding the SQLite file's write lock until ``release``."""

    def __init__(self, path: Path, journal_mode: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(path), journal_mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "locked\n"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait() == 0
        assert self.process.stdout is not None
        self.process.stdout.close()
