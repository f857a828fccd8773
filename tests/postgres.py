"""A throwaway Postgres server for the tests that need one (the store's, and several gateways on one database).

The server is Debian's binaries (``initdb``, ``pg_ctl``: on PATH or under /usr/lib/postgresql/*/bin), started
once per session in a temporary folder, listening on a Unix socket there only (no TCP port, no password), as
``nobody`` when the tests run as root (initdb refuses root). Without the binaries the Postgres cases skip,
loudly; under ``CI=true`` they fail instead (``.ci/run`` installs the package).

A test module or conftest that needs it imports the fixture: ``from tests.postgres import postgres_server as
postgres_server``.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "postgres_server"]


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "pg_ctl").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.fail("the tests run as root and initdb refuses root, but runuser (util-linux) is not installed")
    return [runuser, "-u", "nobody", "--", *argv]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Postgres tests cannot run under CI: {reason}. Install Debian's postgresql package.")
    pytest.skip(f"POSTGRES TESTS SKIPPED: {reason} (install Debian's postgresql package to run them)")


class PostgresServer:
    """A running throwaway server; ``new_database()`` gives each test its own database."""

    def __init__(self, socket_dir: Path) -> None:
        self.socket_dir = socket_dir

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"

        async def create() -> None:
            import asyncpg

            conn = await asyncpg.connect(host=str(self.socket_dir), user="postgres", database="postgres")
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return self.url(name)


PREFIX = "memserve-pg-"


def _stop_orphans(bindir: Path) -> None:
    """Stop the servers of earlier test sessions that were killed before their teardown (SIGKILL, OOM)."""
    for owner in Path(tempfile.gettempdir()).glob(f"{PREFIX}*/owner"):
        try:
            os.kill(int(owner.read_text()), 0)
            continue  # its session is still running
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        _stop(bindir, owner.parent)


def _stop(bindir: Path, folder: Path) -> None:
    data = folder / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(
            _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
            cwd=folder,
            capture_output=True,
        )
    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _started() -> Iterator[PostgresServer]:
    """Start a server in a new temporary folder; stop it and remove the folder at the end."""
    bindir = _postgres_bin()
    if bindir is None:
        _unavailable("initdb/pg_ctl not found on PATH nor under /usr/lib/postgresql/*/bin")
    assert bindir is not None
    _stop_orphans(bindir)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))  # short: a socket path is at most 107 bytes
    (folder / "owner").write_text(str(os.getpid()))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    data = folder / "data"
    initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]
    options = (
        f"-c listen_addresses='' -c unix_socket_directories={folder} -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c shared_buffers=16MB -c max_connections=100"
    )
    start = [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"]
    try:
        for argv in ([*initdb, "--no-locale", "--no-sync", "--no-instructions"], start):
            subprocess.run(_as_server_user(argv), cwd=folder, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        _stop(bindir, folder)
        pytest.fail(f"could not start a throwaway Postgres: {exc.stderr}{exc.stdout}{log}")
    try:
        yield PostgresServer(folder)
    finally:
        _stop(bindir, folder)


class _Session:
    """One server for the whole session, however many fixtures hold it: pytest makes a separate session fixture
    for each conftest or module that imports ``postgres_server``."""

    server: PostgresServer | None = None
    users = 0
    stack = ExitStack()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's throwaway server (started by the first user, stopped when the last one ends)."""
    if _Session.server is None:
        _Session.server = _Session.stack.enter_context(_started())
    _Session.users += 1
    try:
        yield _Session.server
    finally:
        _Session.users -= 1
        if _Session.users == 0:
            _Session.server = None
            _Session.stack.close()
