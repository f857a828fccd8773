"""The management API of keys and usage: ``/api/keys`` (create, list, show, update, revoke) and ``/api/usage``.

Admin keys only (``Auth`` refuses any other key on ``/api/*`` before a handler runs). A key's secret is in
the answer to its creation and nowhere else, ever. ``memserve keys`` and ``memserve usage`` call these
routes when given ``--url``, and the store directly otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from memserve.errors import InvalidArgument, StoreUnavailable
from memserve.gateway import openapi
from memserve.store.keys import KeyStore
from memserve.store.usage import UsageLog
from memserve.units import parse_period
from memserve.wire.http import handles, json_body, parse_body
from memserve.wire.routes import KEY, KEY_CREATE, KEY_REVOKE, KEY_UPDATE, KEYS, USAGE

GroupBy = Literal["key", "user", "model", "day"]
_CENTURY_SECONDS = 100 * 365 * 86400
MAX_RATE = 2**31 - 1  # a 32-bit column
MAX_LIMIT = 10**15  # a 64-bit column with room to add: any real limit is far below
KEY_FIELDS = ("models", "rpm", "tpm", "daily_tokens", "monthly_tokens", "expires", "admin")


class KeyLimits(BaseModel):
    """What a key may use. ``models``: the models it may call (null or ["*"]: every one); limits: null is none."""

    model_config = ConfigDict(extra="forbid", strict=True)
    models: list[str] | None = Field(default=None, description='Models the key may call; null or ["*"]: all.')
    rpm: int | None = Field(default=None, ge=1, le=MAX_RATE, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=1, le=MAX_RATE, description="Tokens (prompt + completion) per minute.")
    daily_tokens: int | None = Field(default=None, ge=1, le=MAX_LIMIT, description="Tokens per UTC day.")
    monthly_tokens: int | None = Field(default=None, ge=1, le=MAX_LIMIT, description="Tokens per UTC calendar month.")
    expires: str | int | None = Field(default=None, description='Expires after this long: "30d", "12h", seconds.')
    admin: bool = Field(default=False, description="May call /api/* (load, unload, keys, usage, events).")


class KeyCreate(KeyLimits):
    """``POST /api/keys``: a new key; its secret is in the answer, once."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[\w.@-]+$", description="Unique; letters, digits, _.@-")


def key_changes(fields: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The KeyStore arguments of the fields given: ``models`` ["*"] is every model, ``expires`` a period from now
    (null: never)."""
    changes = dict(fields)
    if "models" in changes:
        models = changes["models"]
        changes["models"] = None if models is None or "*" in models else sorted(set(models))
    if "expires" in changes:
        period = changes.pop("expires")
        seconds = None if period is None else parse_period(period, what="expires")
        if seconds is not None and seconds > _CENTURY_SECONDS:
            raise InvalidArgument(
                f"expires {period!r} is more than 100 years away; leave it out for a key that never expires",
                param="expires",
            )
        changes["expires_at"] = None if seconds is None else now + timedelta(seconds=seconds)
    return changes


def parse_time(text: str | None, now: datetime, *, what: str) -> datetime | None:
    """``7d`` (that long ago), or an ISO date or time (UTC unless it says otherwise); None for None."""
    if text is None or not text.strip():
        return None
    try:
        return now - timedelta(seconds=parse_period(text, what=what))
    except InvalidArgument:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidArgument(
            f"cannot read {what} {text!r}: expected a period back from now (7d, 12h) or an ISO date (2026-11-01)",
            param=what,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_account_routes(
    app: FastAPI,
    keys: Callable[[], KeyStore | None],
    usage: Callable[[], UsageLog | None],
    max_body_bytes: int,
) -> None:
    """Register the key and usage routes; ``keys``/``usage`` give the open store's parts (None before it opens)."""

    def key_store() -> KeyStore:
        store = keys()
        if store is None:
            raise StoreUnavailable("the key store is not open (the server is starting or stopping); retry shortly")
        return store

    def usage_log() -> UsageLog:
        log = usage()
        if log is None:
            raise StoreUnavailable("the usage store is not open (the server is starting or stopping); retry shortly")
        return log

    errors = openapi.responses(None, {**openapi.JSON_BODY_ERRORS, 400: "a bad field, or a key name already used"})
    no_key = {404: "no key has that name or prefix"}
    one_key = openapi.responses(None, {**openapi.COMMON_ERRORS, **no_key})
    key_changed = openapi.responses(
        None, {**openapi.JSON_BODY_ERRORS, 400: "a bad field, or a key name already used", **no_key}
    )

    @handles(app, KEYS, responses=openapi.responses(None, openapi.COMMON_ERRORS))
    async def list_keys() -> dict[str, Any]:
        return {"keys": [k.to_json() for k in await key_store().list()]}

    @handles(app, KEY_CREATE, responses=errors, openapi_extra=openapi.body_doc(KeyCreate))
    async def create_key(request: Request) -> dict[str, Any]:
        body = parse_body(KeyCreate, await json_body(request, max_body_bytes))
        fields = key_changes(body.model_dump(include=set(KEY_FIELDS)), datetime.now(UTC))
        key, secret = await key_store().create(body.name, **fields)
        return {"key": key.to_json(), "secret": secret}

    @handles(app, KEY, responses=one_key)
    async def show_key(name: str) -> dict[str, Any]:
        return {"key": (await key_store().get(name)).to_json()}

    @handles(app, KEY_UPDATE, responses=key_changed, openapi_extra=openapi.body_doc(KeyLimits))
    async def update_key(name: str, request: Request) -> dict[str, Any]:
        body = parse_body(KeyLimits, await json_body(request, max_body_bytes))
        fields = key_changes(body.model_dump(include=body.model_fields_set), datetime.now(UTC))
        return {"key": (await key_store().update(name, **fields)).to_json()}

    @handles(app, KEY_REVOKE, responses=one_key)
    async def revoke_key(name: str) -> dict[str, Any]:
        return {"key": (await key_store().revoke(name)).to_json()}

    @handles(app, USAGE, responses=openapi.responses(None, openapi.COMMON_ERRORS))
    async def usage_summary(
        group_by: GroupBy = "key",
        since: Annotated[str | None, Query(description="7d, 12h, or an ISO date; default: everything")] = None,
        until: Annotated[str | None, Query(description="7d, 12h, or an ISO date; default: now")] = None,
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        start, end = parse_time(since, now, what="since"), parse_time(until, now, what="until")
        log = usage_log()
        with contextlib.suppress(StoreUnavailable):  # what it holds is part of the answer, when it can be written
            await log.flush()
        rows = await log.summary(group_by, start, end)
        return {"group_by": group_by, "since": _iso(start), "until": _iso(end), "rows": rows}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


__all__ = ["KeyCreate", "KeyLimits", "add_account_routes", "key_changes", "parse_time"]
