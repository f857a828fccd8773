"""The ``memserve`` command line. Each command lives in its own module and is registered here.

Errors are one line on stderr (``error: what happened; what to do``) with a non-zero exit: 1 for a
memserve error, 2 for a usage error, 3 when nothing fits (``fit``), 4 when ``serve`` cannot listen on
its address (the port is in use, say). Tracebacks are for bugs only.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from memserve import __version__
from memserve.cli.adapters import adapters
from memserve.cli.batch import batch
from memserve.cli.bench import bench
from memserve.cli.compare import compare
from memserve.cli.demo_model import demo_model
from memserve.cli.fit import fit
from memserve.cli.keys import keys, usage
from memserve.cli.manage import load, ps, unload
from memserve.cli.run_model import run_model
from memserve.cli.serve import serve
from memserve.errors import MemserveError


class _Group(click.Group):
    """Turns memserve and click errors into one line instead of a traceback or a usage dump."""

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


main.add_command(adapters)
main.add_command(batch)
main.add_command(bench)
main.add_command(compare)
main.add_command(demo_model)
main.add_command(fit)
main.add_command(keys)
main.add_command(load)
main.add_command(ps)
main.add_command(run_model)
main.add_command(serve)
main.add_command(unload)
main.add_command(usage)

__all__ = ["main"]
