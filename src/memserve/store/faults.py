"""What went wrong with the database, in words that say what to do: every fault becomes a StoreUnavailable.

SQLite reports its faults as short strings on ``sqlite3.OperationalError`` / ``DatabaseError`` (wrapped by
SQLAlchemy in ``DBAPIError``, the driver's exception on ``.orig``); Postgres as asyncpg exceptions or a
plain ``OSError`` when nothing listens. The messages never carry SQL parameters (a key's hash is one) nor
a URL's password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.engine import URL
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError

from memserve.errors import StoreUnavailable


@dataclass(frozen=True)
class Target:
    """The database being talked about: a SQLite file's path or a Postgres URL without its password."""

    label: str
    sqlite: bool
    busy_timeout_seconds: float

    @classmethod
    def of(cls, url: URL, busy_timeout_seconds: float) -> Target:
        if url.get_backend_name() == "sqlite":
            return cls(str(url.database), True, busy_timeout_seconds)
        return cls(url.render_as_string(hide_password=True), False, busy_timeout_seconds)


def _driver_message(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def explain(exc: BaseException, target: Target) -> str:
    """One sentence naming the database, what failed and what to do about it."""
    said = _driver_message(exc)
    low = said.lower()
    path = target.label
    if target.sqlite:
        if "locked" in low:
            return (
                f"The database {path} is locked by another process (still locked after the "
                f"{target.busy_timeout_seconds:g} s busy timeout). Find it with `fuser {path}` and stop it, "
                "or wait until it finishes and try again."
            )
        if "not a database" in low or "malformed" in low:
            return corrupt_message(path)
        if "readonly" in low or "read-only" in low:
            return (
                f"The database {path} is read-only for this user (SQLite: {said}). Make the file and its folder "
                "writable (SQLite writes -wal and -shm files next to it), or set database_url to a writable place."
            )
        if "disk is full" in low or "database or disk is full" in low:
            return f"The disk holding {path} is full (SQLite: {said}). Free some space there."
        if "unable to open" in low:
            return (
                f"Cannot open the database {path} (SQLite: {said}). Check that its folder exists and is writable "
                "by this user, or set database_url to another place."
            )
        return f"The database {path} failed (SQLite: {said}). Check the file and the disk it is on."
    if isinstance(exc, OSError | TimeoutError) or "connect" in low or "connection" in low:
        return (
            f"Cannot reach the Postgres server at {path} ({type(exc).__name__}: {said}). Check that it is running "
            "and that database_url's host, port or socket folder is right."
        )
    if "does not exist" in low and "database" in low:
        return f"Postgres at {path}: {said}. Create it (createdb NAME) or fix database_url."
    if "authentication" in low or "password" in low:
        return f"Postgres at {path} refused the login: {said}. Fix the user or password in database_url."
    return f"The database {path} failed (Postgres: {said})."


def refused_rows(exc: BaseException) -> bool:
    """Whether a write failed for what its rows hold (a value the database cannot store: text that is not
    UTF-8, a number out of the column's range), not for the database itself: the same rows would fail again.
    Read through ``translated``'s StoreUnavailable (``__cause__``) and SQLAlchemy's wrapper (``.orig``)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of wrappers, never a long one
        if seen is None:
            return False
        if isinstance(seen, DataError | IntegrityError | UnicodeError | OverflowError):
            return True
        orig = getattr(seen, "orig", None)
        seen = orig if isinstance(orig, BaseException) else seen.__cause__
    return False


def corrupt_message(path: str) -> str:
    return (
        f"{path} is not a SQLite database, or it is corrupt. memserve never replaces it: move it aside "
        f"(mv {path} {path}.bad) to start with an empty one, or restore it from a backup."
    )


@contextmanager
def translated(target: Target) -> Iterator[None]:
    """Turn a database failure inside the block into a StoreUnavailable that explains it."""
    try:
        yield
    except StoreUnavailable:
        raise
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise StoreUnavailable(explain(exc, target)) from exc
