"""``memserve serve``: the gateway. One OpenAI-compatible server for every configured model and provider.

It never imports torch: each loaded model is a runner process owned by the pool.

What can be checked is checked before anything is loaded, so a mistake costs a second, not a model load:
the listening socket is bound first (and handed to uvicorn, so nothing can take the port in between), then
every configured model's source is checked without the network (local folders and cached snapshots are
read as far as their headers; a hub id is only reported).
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from memserve.errors import MemserveError
from memserve.gateway.auth import auth_mode
from memserve.logs import configure, say
from memserve.net import bind_error_message, is_loopback, listening_sockets

if TYPE_CHECKING:
    from memserve.config import Settings

EXIT_BAD_SOURCE = 1
"""A configured model's source does not exist or is not a checkpoint (the CLI's bad-input status)."""

EXIT_CANNOT_LISTEN = 4
"""The address cannot be listened on: the port is in use, not permitted, or the host is not this machine."""


@click.command("serve")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="memserve.yaml with models and providers (default: $MEMSERVE_CONFIG).",
)
@click.option(
    "--model",
    "model_flags",
    multiple=True,
    metavar="NAME=SOURCE",
    help="Serve a local model (a folder, HF cache id or hub id) as NAME; repeatable.",
)
@click.option("--memory", default=None, help="Budget per device, e.g. cpu=16GiB,cuda:0=20GiB.")
@click.option("--headroom", default=None, help="Never hand out this much per device (default 512MiB).")
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 8000; 0 picks a free one).")
@click.option("--keep-alive", "keep_alive", default=None, help="Default idle time before a model unloads, e.g. 5m.")
@click.option(
    "--insecure",
    is_flag=True,
    help="Serve a network address with auth off (only behind a proxy that authenticates).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="info: one line per request and every load, eviction, kill and restart.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="text (default) for a person; json: one object per line with the request's or event's fields "
    "(config key log_format).",
)
def serve(
    config_file: Path | None,
    model_flags: tuple[str, ...],
    memory: str | None,
    headroom: str | None,
    host: str | None,
    port: int | None,
    keep_alive: str | None,
    insecure: bool,
    log_level: str,
    log_format: str | None,
) -> None:
    """Start the gateway: load models on demand, evict idle ones, refuse what cannot fit.

    Before any model is loaded, the address is bound and every configured model's source is checked.
    Exit status: 0 stopped, 1 bad input (a setting, a model source that does not exist or is not a
    checkpoint, or a store that cannot be opened), 2 usage error, 4 cannot listen on the address (the port
    is in use, say).
    """
    from memserve.config import load_settings

    configure(log_level, "json" if log_format == "json" else "text")  # for what loading the settings says
    flags: dict[str, Any] = {
        "memory": memory,
        "headroom": headroom,
        "host": host,
        "port": port,
        "keep_alive": keep_alive,
        "log_format": log_format,
    }
    settings = load_settings(config_file, model_flags=model_flags, **flags)
    configure(log_level, settings.log_format)
    try:
        settings.auth = auth_mode(settings.auth, settings.host, insecure=insecure)
    except MemserveError as exc:
        say(f"error: {exc.message}", level=logging.ERROR)
        sys.exit(EXIT_BAD_SOURCE)
    try:
        sockets = listening_sockets(settings.host, settings.port)
    except OSError as exc:
        say(f"error: {bind_error_message(settings.host, settings.port, exc)}", level=logging.ERROR)
        sys.exit(EXIT_CANNOT_LISTEN)
    try:
        _check_sources(settings)
        _check_store(settings)
        started = _run(settings, sockets)
    finally:
        for sock in sockets:
            sock.close()
    if not started:
        say("error: the gateway did not start; the lines above say why", level=logging.ERROR)
        sys.exit(1)


def _check_sources(settings: Settings) -> None:
    """Every configured model's source, checked without the network; exit 1 naming each bad one."""
    from memserve.checkpoint.locate import check_source

    bad = 0
    for model in settings.models:
        try:
            checked = check_source(model.source)
        except MemserveError as exc:
            bad += 1
            say(f"error: model {model.name!r}: {exc.message}", level=logging.ERROR)
            continue
        if checked.warning:
            say(f"warning: model {model.name!r} ({model.source}): {checked.note}", level=logging.WARNING)
    if bad:
        say(
            f"error: {bad} model source(s) above cannot be served; fix each source (in the config file or "
            "--model NAME=SOURCE) and start again",
            level=logging.ERROR,
        )
        sys.exit(EXIT_BAD_SOURCE)


def _check_store(settings: Settings) -> None:
    """The store opens (created and migrated on a first start); exit 1 with its message otherwise."""
    import asyncio

    from memserve.store.db import Store, database_url

    async def check() -> None:
        store = await Store.open(database_url(settings.database_url, settings.data_dir))
        await store.close()

    try:
        asyncio.run(check())
    except MemserveError as exc:
        say(f"error: {exc.message}", level=logging.ERROR)
        sys.exit(EXIT_BAD_SOURCE)


def _run(settings: Settings, sockets: list[socket.socket]) -> bool:
    """Build the pool and the app and serve on ``sockets`` until stopped; False if the server did not start."""
    import uvicorn

    from memserve.gateway.app import create_app
    from memserve.gateway.ui import close_live_streams
    from memserve.memory.probe import probe_inventory
    from memserve.pool.pool import ModelPool

    inventory = probe_inventory(memory=settings.memory, headroom=settings.headroom)
    if not is_loopback(settings.host) and settings.auth == "off":
        click.secho(
            f"WARNING: listening on {settings.host} with auth off (--insecure): every model and the management "
            "API are open to anyone who can reach it; only do this behind a proxy that authenticates",
            fg="red",
            bold=True,
            err=True,
        )
    pool = ModelPool(settings, inventory)
    app = create_app(settings, pool)
    port = sockets[0].getsockname()[1]
    names = ", ".join(m.name for m in settings.models) or "none"
    remote = ", ".join(p.name for p in settings.providers) or "none"
    usable = ", ".join(
        f"{name} {d['usable_bytes'] / 2**30:.1f} GiB" for name, d in pool.ledger.to_json()["devices"].items()
    )
    say(
        f"memserve gateway on http://{settings.host}:{port}  models: {names}  providers: {remote}  usable: {usable}"
        f"  auth: {settings.auth}" + ("" if settings.auth == "off" else " (requests need an API key)"),
        url=f"http://{settings.host}:{port}",
        auth=settings.auth,
        models=[m.name for m in settings.models],
        providers=[p.name for p in settings.providers],
    )

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            close_live_streams(app)  # uvicorn drains open responses: an open /ui tab would hold it for 30 s
            await super().shutdown(sockets)

    server = Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=port,
            log_level="warning",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=30,
        )
    )
    server.run(sockets=sockets)
    return bool(server.started)
