"""Store fixtures: every store test runs on SQLite and on a throwaway Postgres (``tests/postgres.py``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from memserve.store import database_url
from tests.postgres import PostgresServer
from tests.postgres import postgres_server as postgres_server  # the session's server, for the tests here


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database's async URL, on each backend in turn."""
    if request.param == "sqlite":
        return database_url(None, tmp_path / "data")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return database_url(server.new_database(), tmp_path)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return database_url(None, tmp_path / "data")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder any user can enter (pytest's tmp_path is private to root), for tests run as ``nobody``."""
    folder = Path(tempfile.mkdtemp(prefix="memserve-store-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(0o777)
        shutil.rmtree(folder, ignore_errors=True)
