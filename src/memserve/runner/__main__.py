"""``python -m memserve.runner --plan PLAN.json (--socket PATH | --port P)``: one model, one process."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from memserve.errors import MemserveError
from memserve.runner.load import emit, read_plan_file


@click.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="A plan file: the output of memserve fit MODEL --json.")
@click.option("--socket", type=click.Path(path_type=Path), default=None, help="Listen on this Unix socket.")
@click.option("--port", type=int, default=None, help="Listen on 127.0.0.1:PORT.")
@click.option("--name", default=None, help="The model name clients use (default: the folder name).")
@click.option("--max-queue", type=int, default=None, help="Waiting requests beyond the plan's concurrency.")
def main(plan_path: Path, socket: Path | None, port: int | None, name: str | None, max_queue: int | None) -> None:
    """Load one model by its plan and serve it (OpenAI-compatible) until stopped."""
    from memserve.runner.serve import serve

    if (socket is None) == (port is None):
        raise click.UsageError("pass exactly one of --socket PATH or --port P")
    try:
        source, plan = read_plan_file(plan_path)
        serve(source, plan, name=name, port=port, socket=socket, max_queue=max_queue)
    except MemserveError as exc:
        emit({"event": "failed", "error": exc.message})
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
