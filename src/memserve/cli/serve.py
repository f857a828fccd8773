"""``memserve serve``: the gateway. One OpenAI-compatible server for every configured model and provider.

It never imports torch: each loaded model is a runner process owned by the pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from memserve.net import is_loopback


@click.command("serve")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="memserve.yaml with models and providers (default: $MEMSERVE_CONFIG).")
@click.option("--model", "model_flags", multiple=True, metavar="NAME=SOURCE",
              help="Serve a local model (a folder, HF cache id or hub id) as NAME; repeatable.")
@click.option("--memory", default=None, help="Budget per device, e.g. cpu=16GiB,cuda:0=20GiB.")
@click.option("--headroom", default=None, help="Never hand out this much per device (default 512MiB).")
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 8000).")
@click.option("--keep-alive", "keep_alive", default=None, help="Default idle time before a model unloads, e.g. 5m.")
def serve(config_file: Path | None, model_flags: tuple[str, ...], memory: str | None, headroom: str | None,
          host: str | None, port: int | None, keep_alive: str | None) -> None:
    """Start the gateway: load models on demand, evict idle ones, refuse what cannot fit."""
    import uvicorn

    from memserve.config import load_settings
    from memserve.gateway.app import create_app
    from memserve.memory.probe import probe_inventory
    from memserve.pool.pool import ModelPool

    flags: dict[str, Any] = {"memory": memory, "headroom": headroom, "host": host, "port": port,
                             "keep_alive": keep_alive}
    settings = load_settings(config_file, model_flags=model_flags, **flags)
    inventory = probe_inventory(memory=settings.memory, headroom=settings.headroom)
    if not is_loopback(settings.host):
        click.secho(f"WARNING: listening on {settings.host} exposes every model to the network with NO "
                    "authentication (per-key auth is not built yet); bind 127.0.0.1 unless you mean it",
                    fg="red", bold=True, err=True)
    pool = ModelPool(settings, inventory)
    app = create_app(settings, pool)
    names = ", ".join(m.name for m in settings.models) or "none"
    remote = ", ".join(p.name for p in settings.providers) or "none"
    usable = ", ".join(f"{name} {d['usable_bytes'] / 2**30:.1f} GiB" for name, d in
                       pool.ledger.to_json()["devices"].items())
    click.echo(f"memserve gateway on http://{settings.host}:{settings.port}  models: {names}  providers: {remote}  "
               f"usable: {usable}", err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=30)
