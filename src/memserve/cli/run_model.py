"""``memserve run-model MODEL``: plan it like ``fit``, then run one runner in the foreground."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from memserve.engines.fit import fit_result
from memserve.errors import EXIT_NO_FIT
from memserve.memory.probe import probe_inventory


@click.command("run-model")
@click.argument("model")
@click.option("--port", type=int, default=8001, show_default=True, help="Listen on 127.0.0.1:PORT.")
@click.option("--socket", type=click.Path(path_type=Path), default=None, help="Listen on a Unix socket instead.")
@click.option("--context", type=int, default=None, help="Tokens per sequence (default: model limit, at most 4096).")
@click.option("--concurrency", type=int, default=4, show_default=True, help="Sequences generated at once.")
@click.option("--memory", default=None, help="Budget per device, e.g. cpu=16GiB,cuda:0=20GiB.")
@click.option("--headroom", default=None, help="Never hand out this much per device.")
@click.option("--quantization", default="auto", show_default=True, help="auto, none, int8 or 4bit.")
@click.option("--name", default=None, help="The model name clients use (default: the folder name).")
@click.option("--max-queue", type=int, default=None, help="Waiting requests allowed beyond --concurrency.")
def run_model(
    model: str,
    port: int,
    socket: Path | None,
    context: int | None,
    concurrency: int,
    memory: str | None,
    headroom: str | None,
    quantization: str,
    name: str | None,
    max_queue: int | None,
) -> None:
    """Plan MODEL for this machine and serve it on an OpenAI-compatible API until Ctrl-C."""
    from memserve.memory.fit import PlanFile
    from memserve.runner.serve import serve

    inventory = probe_inventory(memory=memory, headroom=headroom)
    facts, _, result = fit_result(
        model, context=context, concurrency=concurrency, quantization=quantization, inventory=inventory
    )
    if result.plan is None:
        assert result.nofit is not None
        click.echo(f"no fit: {result.nofit.message}", err=True)
        sys.exit(EXIT_NO_FIT)
    click.echo(
        f"plan: {result.plan.rung}, {result.plan.dtype}, context {result.plan.context_tokens} × "
        f"{result.plan.concurrency}; serving on {socket or f'http://127.0.0.1:{port}'}",
        err=True,
    )
    serve(
        PlanFile(facts.source, result.plan, max_queue=max_queue),
        name=name,
        port=None if socket else port,
        socket=socket,
    )
