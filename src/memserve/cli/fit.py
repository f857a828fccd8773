"""``memserve fit MODEL``: will this model fit here, and how? Computed from headers, nothing is loaded."""

from __future__ import annotations

import json
import sys
from typing import cast

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memserve.engines import EngineStatus, engines_for, require
from memserve.engines.fit import fit_json, fit_result
from memserve.errors import EXIT_NO_FIT
from memserve.memory.estimate import CONTINUOUS_BATCHING, GENERATE, Engine
from memserve.memory.fit import ModelFacts
from memserve.memory.inventory import Inventory
from memserve.memory.planner import (
    DEFAULT_MAX_BATCH_TOKENS,
    PlanResult,
    Request,
)
from memserve.memory.probe import probe_inventory
from memserve.units import format_bytes
from memserve.wire.images import ImageLimits


def _print_table(
    facts: ModelFacts, request: Request, result: PlanResult, inventory: Inventory, engines: list[EngineStatus]
) -> None:
    console = Console()
    console.print(
        f"[bold]{facts.source}[/]  {facts.model_type}, {facts.params / 1e9:.2f}B params, "
        f"{format_bytes(facts.weights_bytes)} {facts.dtype} in {facts.shards} shard(s), "
        f"KV {format_bytes(facts.kv_bytes_per_token())}/token"
    )
    for warning in facts.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    for d in inventory.devices:
        budget = f", budget {format_bytes(d.budget_bytes)}" if d.budget_bytes is not None else ""
        console.print(
            f"  {d.name}: {d.description or d.kind} — {format_bytes(d.free_bytes)} free of "
            f"{format_bytes(d.total_bytes)}{budget}, headroom {format_bytes(d.headroom_bytes)} → "
            f"{format_bytes(d.usable_bytes)} usable"
        )
    console.print(
        f"  request: context {request.context_tokens} tokens × {request.concurrency} sequence(s), "
        f"quantization {request.quantization}"
    )
    table = Table(title="placement ladder (first that fits wins)")
    for col in ("rung", "runner", "fits", "dtype", "needs", "why"):
        table.add_column(col, overflow="fold")
    chosen = result.plan.rung if result.plan else None
    for rung in result.rungs:
        mark = "[green]yes[/]" if rung.fits else ("[dim]n/a[/]" if not rung.available else "[red]no[/]")
        name = f"[bold]{rung.name} ◀[/]" if rung.name == chosen else rung.name
        needs = ", ".join(f"{d} {format_bytes(n.total_bytes)}" for d, n in rung.devices.items()) or "-"
        quant = "" if rung.quantization == "none" else f" {rung.quantization}"
        table.add_row(name, rung.runner, mark, rung.dtype + quant, needs, escape(rung.why))
    console.print(table)
    kinds = Table(title="engines (runner kinds)")
    for col in ("engine", "installed", "considered", "why"):
        kinds.add_column(col, overflow="fold")
    for engine in engines:
        kinds.add_row(
            engine.name,
            "yes" if engine.installed else "[dim]no[/]",
            "[green]yes[/]" if engine.considered else "[dim]no[/]",
            escape(engine.why),  # install hints hold brackets: memserve[vllm]
        )
    console.print(kinds)
    if result.plan is None:
        return
    p = result.plan
    detail = Table(
        title=f"plan: {p.rung}, {p.dtype}{'' if p.quantization == 'none' else ' ' + p.quantization}, "
        f"context {p.context_tokens} × {p.concurrency}"
    )
    for col in ("device", "weights", "KV cache", "activations", "runtime", "total", "usable"):
        detail.add_column(col, justify="right")
    for name, n in p.devices.items():
        detail.add_row(
            name,
            *(
                format_bytes(v)
                for v in (
                    n.weights_bytes,
                    n.kv_cache_bytes,
                    n.activation_bytes,
                    n.runtime_bytes,
                    n.total_bytes,
                    n.free_bytes,
                )
            ),
        )
    console.print(detail)


@click.command("fit")
@click.argument("model")
@click.option(
    "--context",
    type=int,
    default=None,
    help="Tokens per sequence (prompt + completion). Default: the model's limit, at most 4096.",
)
@click.option("--concurrency", type=int, default=1, show_default=True, help="Sequences served at once.")
@click.option(
    "--memory",
    "memory",
    default=None,
    help="Budget per device, e.g. cpu=16GiB,cuda:0=20GiB (plain byte counts work too).",
)
@click.option("--headroom", default=None, help="Never hand out this much per device, e.g. 1GiB or cpu=2GiB.")
@click.option("--quantization", default="auto", show_default=True, help="auto, none, int8 or 4bit.")
@click.option(
    "--min-context",
    type=int,
    default=None,
    help="Allow a smaller context down to this many tokens when the requested one does not fit.",
)
@click.option(
    "--max-batch-tokens",
    type=int,
    default=DEFAULT_MAX_BATCH_TOKENS,
    show_default=True,
    help="Tokens in one forward (prefill chunk); bounds activation memory.",
)
@click.option("--adapter", "adapters", multiple=True, help="A LoRA adapter folder to load on top (repeatable).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Restrict placement to host RAM or GPUs.",
)
@click.option(
    "--engine",
    type=click.Choice([CONTINUOUS_BATCHING, GENERATE]),
    default=CONTINUOUS_BATCHING,
    show_default=True,
    help="The runner's engine: each holds its KV cache and activations its own way.",
)
@click.option(
    "--runner",
    type=click.Choice(["auto", "transformers", "vllm", "llama.cpp"]),
    default="auto",
    show_default=True,
    help="The engine that serves it: auto picks among the installed ones; a missing one named here is an error.",
)
@click.option(
    "--max-images", type=int, default=4, show_default=True, help="Images in one request (a vision-language model)."
)
@click.option(
    "--max-image-pixels",
    type=int,
    default=2048 * 2048,
    show_default=True,
    help="Width × height of one image (a vision-language model).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fit(
    model: str,
    context: int | None,
    concurrency: int,
    memory: str | None,
    headroom: str | None,
    quantization: str,
    min_context: int | None,
    max_batch_tokens: int,
    adapters: tuple[str, ...],
    device: str,
    engine: str,
    runner: str,
    max_images: int,
    max_image_pixels: int,
    as_json: bool,
) -> None:
    """Say whether MODEL fits on this machine and how, from its headers alone.

    MODEL is a local folder, a Hugging Face cache id or a hub id (org/name[@revision]).
    Exit status: 0 a plan fits, 1 bad input, 3 nothing fits.
    """
    if runner in ("vllm", "llama.cpp"):
        require(runner)  # before anything is read or loaded: the error names the install command
    inventory = probe_inventory(memory=memory, headroom=headroom)
    facts, request, result = fit_result(
        model,
        context=context,
        concurrency=concurrency,
        quantization=quantization,
        min_context=min_context,
        max_batch_tokens=max_batch_tokens,
        adapters=adapters,
        device=device,
        inventory=inventory,
        engine=cast(Engine, engine),  # one of click's choices, which are Engine's values
        runner=runner,
        images=ImageLimits(max_images=max_images, max_pixels=max_image_pixels),
    )
    engines = engines_for(has_gpu=bool(inventory.gpus), model_format=facts.format, gguf=facts.format == "gguf")
    if as_json:
        data = fit_json(facts, request, result, inventory)
        click.echo(json.dumps(data, indent=2))
    else:
        _print_table(facts, request, result, inventory, engines)
    if result.nofit is not None:
        if not as_json:
            click.echo(f"no fit: {result.nofit.message}", err=True)
        sys.exit(EXIT_NO_FIT)
