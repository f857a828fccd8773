"""``memserve keys …`` and ``memserve usage``: API keys and what they used.

Both work on the store directly (the database of ``--config``/``MEMSERVE_DATABASE_URL``, SQLite in the data
folder by default: run them where the server runs), or, with ``--url``, on a running gateway through its
admin API, with an admin key from ``--api-key`` or ``MEMSERVE_API_KEY``/``MEMSERVE_ADMIN_KEY``. A new key's
secret is printed once, on stdout alone (so ``$(memserve keys create ci)`` captures it), and never again.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import click
from rich.console import Console
from rich.table import Table

from memserve.cli.manage import DEFAULT_URL, GatewayClient

T = TypeVar("T")
_TIMEOUT_SECONDS = 30.0

url_option = click.option("--url", default=None, help=f"A running gateway (e.g. {DEFAULT_URL}) instead of the store.")
api_key_option = click.option(
    "--api-key", default=None, help="Admin key for --url (default: $MEMSERVE_API_KEY, then $MEMSERVE_ADMIN_KEY)."
)
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="memserve.yaml naming the store (database_url, data_dir); default: $MEMSERVE_CONFIG.",
)


def _on_store(config_file: Path | None, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(store)`` on the store the server's settings name, opened (and migrated) for this command."""
    from memserve.config import load_settings
    from memserve.store.db import Store, database_url

    settings = load_settings(config_file)

    async def run() -> T:
        store = await Store.open(database_url(settings.database_url, settings.data_dir))
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


class _Keys:
    """The five key operations, on the store or on a gateway, answering the same JSON."""

    def __init__(self, url: str | None, api_key: str | None, config_file: Path | None) -> None:
        self.url, self.api_key, self.config_file = url, api_key, config_file

    def call(self, method: str, path: str, body: dict[str, Any] | None, direct: Callable[[Any], Awaitable[T]]) -> Any:
        if self.url is None:
            return _on_store(self.config_file, direct)
        with GatewayClient(self.url, api_key=self.api_key) as client:
            return client.request(method, path, body, timeout_seconds=_TIMEOUT_SECONDS)


def _changes(options: dict[str, Any]) -> dict[str, Any]:
    """The fields given on the command line, as the API takes them (``--models a,b``; ``none`` clears a limit)."""
    fields: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name == "models":
            fields[name] = None if value.strip() == "*" else [m.strip() for m in value.split(",") if m.strip()]
        elif name in ("rpm", "tpm", "daily_tokens", "monthly_tokens", "expires") and str(value).lower() == "none":
            fields[name] = None
        elif name in ("rpm", "tpm", "daily_tokens", "monthly_tokens"):
            try:
                fields[name] = int(value)
            except ValueError:
                raise click.BadParameter(f"{value!r} is not a whole number (or none)", param_hint=f"--{name}") from None
        else:
            fields[name] = value
    return fields


def _limit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--models", default=None, help="Models it may call, comma-separated; * for all (default)."),
            click.option("--rpm", default=None, help="Requests per minute (none: no limit)."),
            click.option("--tpm", default=None, help="Tokens per minute, prompt and completion (none: no limit)."),
            click.option("--daily-tokens", "daily_tokens", default=None, help="Tokens per UTC day (none: no limit)."),
            click.option("--monthly-tokens", "monthly_tokens", default=None, help="Tokens per UTC month."),
            click.option("--expires", default=None, help="Expires after e.g. 30d, 12h (none: never)."),
        ]
    ):
        f = option(f)
    return f


@click.group("keys")
def keys() -> None:
    """API keys: create, list, show, update, revoke (on the store, or a gateway with --url)."""


@keys.command("create")
@click.argument("name")
@_limit_options
@click.option("--admin", is_flag=True, help="May call /api/* (load, unload, keys, usage, events).")
@url_option
@api_key_option
@config_option
def create(
    name: str, admin: bool, url: str | None, api_key: str | None, config_file: Path | None, **limits: Any
) -> None:
    """Create key NAME and print its secret (once: only a hash is kept)."""
    from memserve.gateway.accounts import KeyCreate, key_changes

    fields = _changes(limits)
    body = {"name": name, **fields, "admin": admin}
    KeyCreate.model_validate(body)  # the same checks the gateway makes, before anything is written

    async def direct(store: Any) -> dict[str, Any]:
        key, secret = await store.keys.create(name, **key_changes({**fields, "admin": admin}, datetime.now(UTC)))
        return {"key": key.to_json(), "secret": secret}

    answer = _Keys(url, api_key, config_file).call("POST", "/api/keys", body, direct)
    click.echo(answer["secret"])
    click.echo(
        f"key {name!r} created ({answer['key'].get('prefix')}…): the secret above is shown once, store it now",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON list.")
@url_option
@api_key_option
@config_option
def list_keys(as_json: bool, url: str | None, api_key: str | None, config_file: Path | None) -> None:
    """Every key: prefix, models, limits, state."""

    async def direct(store: Any) -> dict[str, Any]:
        return {"keys": [k.to_json() for k in await store.keys.list()]}

    rows = _Keys(url, api_key, config_file).call("GET", "/api/keys", None, direct)["keys"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("NAME", "PREFIX", "MODELS", "RPM", "TPM", "DAILY", "MONTHLY", "ADMIN", "STATE", "LAST USED")
    for row in rows:
        table.add_row(
            row["name"],
            f"{row.get('prefix', '')}…",
            ", ".join(row.get("models") or ["*"]),
            *(_limit(row.get(k)) for k in ("rpm", "tpm", "daily_tokens", "monthly_tokens")),
            "yes" if row.get("admin") else "",
            _state(row),
            (row.get("last_used_at") or "never")[:19],
        )
    Console().print(table)


@keys.command("show")
@click.argument("name")
@url_option
@api_key_option
@config_option
def show(name: str, url: str | None, api_key: str | None, config_file: Path | None) -> None:
    """One key as JSON (never its secret)."""

    async def direct(store: Any) -> dict[str, Any]:
        return {"key": (await store.keys.get(name)).to_json()}

    click.echo(
        json.dumps(
            _Keys(url, api_key, config_file).call("GET", f"/api/keys/{quote(name, safe='')}", None, direct)["key"],
            indent=2,
        )
    )


@keys.command("update")
@click.argument("name")
@_limit_options
@click.option("--admin/--no-admin", default=None, help="Make it an admin key, or not.")
@url_option
@api_key_option
@config_option
def update(
    name: str, admin: bool | None, url: str | None, api_key: str | None, config_file: Path | None, **limits: Any
) -> None:
    """Change key NAME's models, limits, expiry or admin flag (only what is given)."""
    from memserve.gateway.accounts import KeyLimits, key_changes

    fields = _changes({**limits, "admin": admin})
    if not fields:
        raise click.UsageError(
            "nothing to change: give --models, --rpm, --tpm, --daily-tokens, --monthly-tokens, --expires or --admin"
        )
    KeyLimits.model_validate(fields)

    async def direct(store: Any) -> dict[str, Any]:
        return {"key": (await store.keys.update(name, **key_changes(fields, datetime.now(UTC)))).to_json()}

    row = _Keys(url, api_key, config_file).call("PATCH", f"/api/keys/{quote(name, safe='')}", fields, direct)["key"]
    click.echo(f"key {row['name']!r} updated", err=True)


@keys.command("revoke")
@click.argument("name")
@url_option
@api_key_option
@config_option
def revoke(name: str, url: str | None, api_key: str | None, config_file: Path | None) -> None:
    """Revoke key NAME: it is refused from now on (other gateways: within the key cache's few seconds)."""

    async def direct(store: Any) -> dict[str, Any]:
        return {"key": (await store.keys.revoke(name)).to_json()}

    row = _Keys(url, api_key, config_file).call("DELETE", f"/api/keys/{quote(name, safe='')}", None, direct)["key"]
    click.echo(f"key {row['name']!r} revoked", err=True)


@click.command("usage")
@click.option("--by", "group_by", type=click.Choice(["key", "user", "model", "day"]), default="key", show_default=True)
@click.option("--since", default=None, help="7d, 12h, or an ISO date (default: everything).")
@click.option("--until", default=None, help="7d, 12h, or an ISO date (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON rows.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@url_option
@api_key_option
@config_option
def usage(
    group_by: str,
    since: str | None,
    until: str | None,
    as_json: bool,
    as_csv: bool,
    url: str | None,
    api_key: str | None,
    config_file: Path | None,
) -> None:
    """Requests and tokens per key, end user, model or day."""
    from memserve.gateway.accounts import parse_time

    if url is not None:
        query = urlencode({k: v for k, v in (("group_by", group_by), ("since", since), ("until", until)) if v})
        with GatewayClient(url, api_key=api_key) as client:
            rows = client.request("GET", f"/api/usage?{query}", timeout_seconds=_TIMEOUT_SECONDS)["rows"]
    else:
        now = datetime.now(UTC)
        start, end = parse_time(since, now, what="since"), parse_time(until, now, what="until")

        async def direct(store: Any) -> list[dict[str, Any]]:
            result: list[dict[str, Any]] = await store.usage.summary(group_by, start, end)
            return result

        rows = _on_store(config_file, direct)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    elif as_csv:
        out = io.StringIO()
        if rows:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        sys.stdout.write(out.getvalue())
    else:
        table = Table(*(rows[0].keys() if rows else (group_by.upper(), "REQUESTS")))
        for row in rows:
            table.add_row(*(_cell(v) for v in row.values()))
        Console().print(table)


def _limit(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _state(row: dict[str, Any]) -> str:
    if row.get("revoked_at"):
        return "revoked"
    expires = row.get("expires_at")
    if expires and datetime.fromisoformat(expires) <= datetime.now(UTC):
        return "expired"
    return f"active (until {expires[:10]})" if expires else "active"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


__all__ = ["keys", "usage"]
