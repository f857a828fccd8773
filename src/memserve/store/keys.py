"""API keys: issued once, stored as a sha256 only, verified on every request from a short in-memory cache.

A secret is ``ms-`` + ``secrets.token_urlsafe(32)`` (256 random bits, 46 characters); its first 12
characters (``ms-`` and 9 more) are kept as the visible prefix for lists. Nothing else of it is stored,
logged or echoed: a lost secret is replaced, never recovered.

Verification reads the database once per key per ``cache_seconds`` (5 s by default): a key revoked or
changed through another gateway sharing the database takes effect here within that time; through this
one, at once. ``last_used_at`` is written at most once a minute per key, by the usage flusher.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from memserve.errors import InvalidApiKey, InvalidArgument
from memserve.store.faults import Target, translated
from memserve.store.schema import api_keys

SECRET_START = "ms-"
SECRET_LENGTH = len(SECRET_START) + 43  # token_urlsafe(32): 32 bytes in unpadded base64url
PREFIX_LENGTH = 12
LAST_USED_EVERY_SECONDS = 60.0
LIMITS = ("rpm", "tpm", "daily_tokens", "monthly_tokens")
UPDATABLE = frozenset({"models", "expires_at", "admin", *LIMITS})
_SECRET_RE = re.compile(r"ms-[A-Za-z0-9_-]{43}")
_NAME_MAX = 64


@dataclass(frozen=True)
class ApiKey:
    """An issued key as the database holds it, less its hash. ``models`` None means every model."""

    id: str
    name: str
    prefix: str
    models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    daily_tokens: int | None
    monthly_tokens: int | None
    admin: bool
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def allows(self, model: str) -> bool:
        """Whether this key may use ``model`` (an admin key too is limited by its list)."""
        return self.models is None or model in self.models

    def active(self, now: datetime) -> str | None:
        """Why the key cannot be used at ``now`` ("revoked", "expired"), or None when it can."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return None

    def to_json(self) -> dict[str, Any]:
        """What lists and the admin API show: every field but secrets (there is none here to show)."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "models": list(self.models) if self.models is not None else None,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "daily_tokens": self.daily_tokens,
            "monthly_tokens": self.monthly_tokens,
            "admin": self.admin,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "last_used_at": _iso(self.last_used_at),
        }

    @classmethod
    def from_row(cls, row: Row[Any] | Any) -> ApiKey:
        m = row._mapping
        models = m["models"]
        return cls(
            id=m["id"],
            name=m["name"],
            prefix=m["prefix"],
            models=tuple(models) if models is not None else None,
            rpm=m["rpm"],
            tpm=m["tpm"],
            daily_tokens=m["daily_tokens"],
            monthly_tokens=m["monthly_tokens"],
            admin=bool(m["admin"]),
            created_at=m["created_at"],
            expires_at=m["expires_at"],
            revoked_at=m["revoked_at"],
            last_used_at=m["last_used_at"],
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_COLUMNS = [c for c in api_keys.c if c.name != "hash"]


class KeyNotFound(InvalidArgument):
    """No key with that name or prefix: a 404, as for a file or batch that is not there."""

    status_code = 404
    code = "key_not_found"


class KeyStore:
    """Create, list, change, revoke and verify keys. ``verify`` is the hot path; the rest are admin work.

    ``update(key, **changes)``: a field passed is set (``None`` clears a limit, the model list or the
    expiry); a field not passed is left as it is.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        target: Target,
        *,
        clock: Callable[[], datetime],
        cache_seconds: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._target = target
        self._clock = clock
        self.cache_seconds = cache_seconds
        self._monotonic = monotonic
        self._cache: dict[str, tuple[ApiKey, float]] = {}  # hash -> (key, valid until, monotonic)
        self._used: dict[str, datetime] = {}  # key id -> when, not yet written
        self._used_noted: dict[str, float] = {}  # key id -> monotonic time last queued for writing

    async def create(
        self,
        name: str,
        *,
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        daily_tokens: int | None = None,
        monthly_tokens: int | None = None,
        expires_at: datetime | None = None,
        admin: bool = False,
    ) -> tuple[ApiKey, str]:
        """Issue a key. Returns it and its secret: the only time the secret exists outside the caller."""
        name = _check_name(name)
        values = _check_changes(
            {
                "models": models,
                "rpm": rpm,
                "tpm": tpm,
                "daily_tokens": daily_tokens,
                "monthly_tokens": monthly_tokens,
                "expires_at": expires_at,
                "admin": admin,
            }
        )
        secret = SECRET_START + secrets.token_urlsafe(32)
        row = {
            "id": uuid.uuid4().hex,
            "name": name,
            "prefix": secret[:PREFIX_LENGTH],
            "hash": hash_secret(secret),
            "created_at": self._clock(),
            "expires_at": None,
            "revoked_at": None,
            "last_used_at": None,
            **values,
        }
        with translated(self._target):
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(api_keys.insert().values(row))
            except IntegrityError as exc:  # the name: id and hash are random
                raise InvalidArgument(
                    f"An API key named {name!r} exists already (revoked keys keep their names): pick another "
                    "name; `memserve keys list` shows them.",
                    param="name",
                ) from exc
        return await self.get(name), secret

    async def list(self) -> list[ApiKey]:
        """Every key ever issued, revoked and expired ones too, oldest first."""
        with translated(self._target):
            async with self._engine.connect() as conn:
                rows = await conn.execute(sa.select(*_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.name))
                return [ApiKey.from_row(r) for r in rows]

    async def get(self, name_or_prefix: str) -> ApiKey:
        """The key with this name, or else with this 12-character prefix (``ms-AbCdEfGhI``)."""
        with translated(self._target):
            async with self._engine.connect() as conn:
                rows = (await conn.execute(sa.select(*_COLUMNS).where(api_keys.c.name == name_or_prefix))).all()
                if not rows:
                    rows = (await conn.execute(sa.select(*_COLUMNS).where(api_keys.c.prefix == name_or_prefix))).all()
        if len(rows) == 1:
            return ApiKey.from_row(rows[0])
        shown = "that secret" if _SECRET_RE.fullmatch(name_or_prefix) else repr(name_or_prefix)
        if not rows:
            hint = " Pass the name or the 12-character prefix, never the secret." if shown == "that secret" else ""
            raise KeyNotFound(
                f"No API key is named or prefixed {shown}.{hint} See them with `memserve keys list`.", param="key"
            )
        raise InvalidArgument(
            f"Several API keys have the prefix {shown}: name the key instead (see `memserve keys list`).",
            param="key",
        )

    async def revoke(self, name_or_prefix: str) -> ApiKey:
        """Revoke a key for good (revoking a revoked key changes nothing). This gateway refuses it at once."""
        key = await self.get(name_or_prefix)
        if key.revoked_at is None:
            with translated(self._target):
                async with self._engine.begin() as conn:
                    await conn.execute(
                        api_keys.update()
                        .where(api_keys.c.id == key.id, api_keys.c.revoked_at.is_(None))
                        .values(revoked_at=self._clock())
                    )
        self._forget(key.id)
        return await self.get(key.name)

    async def update(self, name_or_prefix: str, **changes: Any) -> ApiKey:
        """Change limits, models, expiry or admin. Passed: set (None clears). Not passed: unchanged."""
        unknown = sorted(set(changes) - UPDATABLE)
        if unknown:
            raise InvalidArgument(
                f"Cannot change {', '.join(unknown)} of an API key: the fields that change are "
                f"{', '.join(sorted(UPDATABLE))} (to rename a key, create a new one and revoke the old).",
                param=unknown[0],
            )
        values = _check_changes(changes)
        key = await self.get(name_or_prefix)
        if key.revoked_at is not None:
            raise InvalidArgument(
                f"The API key {key.name!r} is revoked; a revoked key stays revoked. Create a new one.", param="key"
            )
        if values:
            with translated(self._target):
                async with self._engine.begin() as conn:
                    await conn.execute(api_keys.update().where(api_keys.c.id == key.id).values(values))
            self._forget(key.id)
        return await self.get(key.name)

    async def verify(self, secret: str) -> ApiKey:
        """The usable key for this secret, or InvalidApiKey saying why not (never repeating the secret)."""
        if not isinstance(secret, str) or not secret.startswith(SECRET_START) or not _SECRET_RE.fullmatch(secret):
            raise InvalidApiKey(
                f"The API key is malformed: memserve keys are '{SECRET_START}' followed by 43 letters, digits, "
                "'-' or '_'. Send the secret `memserve keys create` printed, as 'Authorization: Bearer ms-…' "
                "or 'x-api-key: ms-…'."
            )
        digest = hash_secret(secret)
        now_m = self._monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now_m:
            key = cached[0]
        else:
            with translated(self._target):
                async with self._engine.connect() as conn:
                    row = (
                        await conn.execute(sa.select(*_COLUMNS, api_keys.c.hash).where(api_keys.c.hash == digest))
                    ).first()
            if row is None or not hmac.compare_digest(row._mapping["hash"], digest):
                self._cache.pop(digest, None)
                raise InvalidApiKey(
                    "The API key is not one this server issued (or its database is another one). Check the "
                    "key, or ask an admin for a new one (`memserve keys create`)."
                )
            key = ApiKey.from_row(row)
            self._cache[digest] = (key, now_m + self.cache_seconds)
        now = self._clock()
        why = key.active(now)
        if why == "revoked":
            raise InvalidApiKey(
                f"The API key {key.prefix}… was revoked at {_iso(key.revoked_at)}. Ask an admin for a new one."
            )
        if why == "expired":
            raise InvalidApiKey(
                f"The API key {key.prefix}… expired at {_iso(key.expires_at)}. Ask an admin for a new one, or "
                "to extend it (`memserve keys update --expires`)."
            )
        if now_m - self._used_noted.get(key.id, -LAST_USED_EVERY_SECONDS) >= LAST_USED_EVERY_SECONDS:
            self._used_noted[key.id] = now_m
            self._used[key.id] = now
        return key

    async def write_last_used(self) -> None:
        """Write the pending ``last_used_at`` times in one statement (the usage flusher calls this)."""
        pending, self._used = self._used, {}
        if not pending:
            return
        try:
            with translated(self._target):
                async with self._engine.begin() as conn:
                    await conn.execute(
                        api_keys.update()
                        .where(api_keys.c.id == sa.bindparam("key_id"))
                        .values(last_used_at=sa.bindparam("used_at")),
                        [{"key_id": k, "used_at": t} for k, t in pending.items()],
                    )
        except BaseException:
            for k, t in pending.items():
                self._used.setdefault(k, t)
            raise

    def _forget(self, key_id: str) -> None:
        for digest in [d for d, (k, _) in self._cache.items() if k.id == key_id]:
            del self._cache[digest]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument("An API key needs a name (who or what uses it, e.g. 'alice' or 'billing-app').")
    name = name.strip()
    if len(name) > _NAME_MAX or not name.isprintable():
        raise InvalidArgument(
            f"An API key's name is at most {_NAME_MAX} printable characters; got {len(name)}.", param="name"
        )
    if name.startswith(SECRET_START):
        raise InvalidArgument(
            f"An API key's name cannot start with {SECRET_START!r} (keys are looked up by name or by their "
            f"{SECRET_START}… prefix): pick another name.",
            param="name",
        )
    return name


def _check_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Validate create/update fields; ``models=["*"]`` means every model and is stored as NULL."""
    values: dict[str, Any] = {}
    for field, value in changes.items():
        if field in LIMITS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidArgument(
                    f"{field} must be a whole number of at least 1, or None for no limit; got {value!r}.",
                    param=field,
                )
        elif field == "models":
            value = _check_models(value)
        elif field == "expires_at":
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise InvalidArgument(
                    f"expires_at must be a timezone-aware datetime or None; got {value!r}.", param="expires_at"
                )
        elif field == "admin" and not isinstance(value, bool):
            raise InvalidArgument(f"admin must be true or false; got {value!r}.", param="admin")
        values[field] = value
    return values


def _check_models(models: Iterable[str] | None) -> list[str] | None:
    if models is None:
        return None
    if isinstance(models, str):
        raise InvalidArgument(
            f"models must be a list of model names (or None for all); got the string {models!r}.", param="models"
        )
    names = [m.strip() if isinstance(m, str) else m for m in models]
    if not names or any(not isinstance(m, str) or not m for m in names):
        raise InvalidArgument(
            f"models must be a non-empty list of model names, or None (or ['*']) for every model; got {models!r}.",
            param="models",
        )
    if "*" in names:
        return None
    return list(dict.fromkeys(names))
