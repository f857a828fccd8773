"""``memserve demo-adapter BASE OUT``: write a deterministic random LoRA adapter for a demo model."""

from __future__ import annotations

from pathlib import Path

import click

from memserve.checkpoint.demo_adapter import DEFAULT_TARGETS, write_demo_adapter
from memserve.errors import MemserveError
from memserve.units import format_bytes


@click.command("demo-adapter")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank r (alpha is 2r).")
@click.option(
    "--targets",
    default=",".join(DEFAULT_TARGETS),
    show_default=True,
    help="Comma-separated module names of the base to adapt.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="The same base, options and seed give identical weights."
)
def demo_adapter(base: Path, out: Path, rank: int, targets: str, seed: int) -> None:
    """Write a random LoRA adapter for the model at BASE into OUT, with PEFT (both A and B random, so it changes
    the answers). Nothing is downloaded; serve it on its base (a model's adapters) or price it with fit --adapter.

    OUT ending in .gguf writes it as a GGUF LoRA file for llama.cpp instead, for the GGUF of BASE (memserve
    demo-model X.gguf --format gguf with BASE's size, arch and seed)."""
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    try:
        info = write_demo_adapter(base, out, rank=rank, targets=names, seed=seed)
    except MemserveError as exc:
        raise click.ClickException(exc.message) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from exc
    click.echo(
        f"wrote {info.path}: LoRA r={info.rank} on {','.join(info.targets)} ({info.modules} modules), "
        f"{info.params:,} params, {format_bytes(info.weights_bytes)}, {info.seconds:.1f} s"
    )
