"""Small helpers the store tests share."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

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
