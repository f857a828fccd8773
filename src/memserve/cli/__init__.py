"""The ``memserve`` command line. Each command lives in its own module and is registered here, imported only
when it runs (click's lazy subcommands): ``memserve batch run`` does not pay for torch-free planning, the hub
client and the gateway it never uses.

Errors are one line on stderr (``error: what happened; what to do``) with a non-zero exit: 1 for a
memserve error, 2 for a usage error, 3 when nothing fits (``fit``), 4 when ``serve`` cannot listen on
its address (the port is in use, say). Tracebacks are for bugs only.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from memserve import __version__
from memserve.errors import MemserveError

COMMANDS = {
    "adapters": "memserve.cli.adapters:adapters",
    "batch": "memserve.cli.batch:batch",
    "bench": "memserve.cli.bench:bench",
    "compare": "memserve.cli.compare:compare",
    "demo-adapter": "memserve.cli.demo_adapter:demo_adapter",
    "demo-model": "memserve.cli.demo_model:demo_model",
    "fit": "memserve.cli.fit:fit",
    "keys": "memserve.cli.keys:keys",
    "load": "memserve.cli.manage:load",
    "ps": "memserve.cli.manage:ps",
    "run-model": "memserve.cli.run_model:run_model",
    "serve": "memserve.cli.serve:serve",
    "unload": "memserve.cli.manage:unload",
    "usage": "memserve.cli.keys:usage",
}
"""Each command's name → ``module:attribute`` of its click command."""


class _Group(click.Group):
    """Turns memserve and click errors into one line instead of a traceback or a usage dump, and imports a
    command's module only when that command is asked for (click's documented lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = COMMANDS[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{COMMANDS[cmd_name]} is not a click command")
        return command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except MemserveError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(1)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            hint = (
                f" (see: memserve {exc.ctx.command_path.partition(' ')[2]} --help)".replace("  ", " ")
                if isinstance(exc, click.UsageError) and exc.ctx
                else ""
            )
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="memserve")
def main() -> None:
    """memserve: serve language models on the memory this machine really has."""


__all__ = ["main"]
