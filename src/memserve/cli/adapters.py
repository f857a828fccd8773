"""``memserve adapters add|rm|ls``: LoRA adapters on a running gateway's models, without reloading them.

They call the gateway's admin API (``/api/adapters``; with keys on, an admin key from ``--api-key``,
``$MEMSERVE_API_KEY`` or ``$MEMSERVE_ADMIN_KEY``). An adapter added at run time is kept in the gateway's store
(its folder's absolute path), so a restarted gateway serves it again; one removed at run time is not brought back
(unless memserve.yaml lists it under its model's ``adapters:``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import click
from rich.table import Table

from memserve.cli.manage import GatewayClient, echo_json, server_options, stdout_console

_TIMEOUT_SECONDS = 120.0  # reading an adapter's weights into a loaded runner
api_key_option = click.option(
    "--api-key", default=None, help="Admin key (default: $MEMSERVE_API_KEY, then $MEMSERVE_ADMIN_KEY)."
)


@click.group("adapters")
def adapters() -> None:
    """LoRA adapters served on a model's one copy of its weights (docs/adapters.md)."""


@adapters.command("add")
@click.argument("model")
@click.argument("name")
@click.argument("source", type=click.Path(path_type=Path, file_okay=False))
@api_key_option
@server_options
def add(model: str, name: str, source: Path, api_key: str | None, url: str, as_json: bool) -> None:
    """Serve the PEFT adapter folder SOURCE as NAME on MODEL (loaded now if MODEL is, else with it).

    SOURCE is read by the server: give a path on the server's disk (made absolute here).
    """
    body = {"model": model, "name": name, "source": str(source.expanduser().resolve())}
    with GatewayClient(url, api_key=api_key) as client:
        data = client.request("POST", "/api/adapters", body, timeout_seconds=_TIMEOUT_SECONDS)
    if as_json:
        echo_json(data)
        return
    state = data.get("model", {}).get("state", "?")
    click.echo(f"{name} is served on {model} ({state}); clients send model {name!r} or '{model}:{name}'")


@adapters.command("rm")
@click.argument("name")
@api_key_option
@server_options
def rm(name: str, api_key: str | None, url: str, as_json: bool) -> None:
    """Stop serving adapter NAME (requests already running on it finish; new ones get 404)."""
    with GatewayClient(url, api_key=api_key) as client:
        data = client.request("DELETE", f"/api/adapters/{quote(name, safe='')}", timeout_seconds=_TIMEOUT_SECONDS)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{data.get('adapter', name)} removed from {data.get('model', {}).get('name', '?')}")


@adapters.command("ls")
@api_key_option
@server_options
def ls(api_key: str | None, url: str, as_json: bool) -> None:
    """The adapters the gateway serves, with their base model and its state."""
    with GatewayClient(url, api_key=api_key) as client:
        data = client.request("GET", "/api/adapters", timeout_seconds=_TIMEOUT_SECONDS)
    if as_json:
        echo_json(data)
        return
    table = Table("adapter", "model", "state", "source")
    for row in data.get("data", []):
        table.add_row(str(row.get("name")), str(row.get("model")), str(row.get("state")), str(row.get("source")))
    stdout_console().print(table)
