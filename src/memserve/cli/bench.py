"""``memserve bench URL --model M``: load-test an OpenAI-compatible server and find where it saturates.

Steps are concurrency levels (closed loop, ``--concurrency 1,2,4,8,16``, the default) or arrival rates
(open loop with Poisson arrivals, ``--rate 1,2,4``). Each step stops by itself after ``--requests``
(default max(16, 4 × step)) or ``--duration``; each request after ``--timeout``. ``--vs URL2`` runs a
second server in the same run, alternating step by step, and prints B ÷ A ratios.

``--model`` may be a local model folder: its tokenizer then cuts prompts to exactly
``--prompt-tokens`` and the request names the model by the folder's name (what ``memserve run-model``
and ``memserve serve`` call it by default). The definitions of every number are in
``memserve.bench.stats``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from memserve.bench.load import Target, normalize_base_url
from memserve.bench.prompts import DatasetPrompts, PromptSource, SyntheticPrompts, find_tokenizer, load_tokenizer
from memserve.bench.report import (
    LiveReporter,
    PlainReporter,
    comparison_table,
    require_matplotlib,
    results_table,
    write_json,
    write_plot,
)
from memserve.bench.run import BenchConfig, BenchReport, Reporter, run_bench
from memserve.bench.stats import Step
from memserve.errors import InvalidArgument
from memserve.units import parse_seconds

DEFAULT_CONCURRENCY = "1,2,4,8,16"
DEFAULT_PROMPT_TOKENS = 128
PIPED_WIDTH = 200


def _positive_ints(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or any(n < 1 for n in numbers):
        raise click.BadParameter(f"{value!r} is not a list of positive integers, e.g. 1,2,4,8")
    return numbers


def _positive_numbers(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        numbers = [float(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or any(not n > 0 or n == float("inf") for n in numbers):
        raise click.BadParameter(f"{value!r} is not a list of positive numbers (requests per second), e.g. 1,2,4")
    return numbers


def _seconds(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_seconds(value, what=f"--{param.name}")
    except InvalidArgument as exc:
        raise click.BadParameter(exc.message) from exc
    if not 0 < seconds < float("inf"):
        raise click.BadParameter(f"{value!r} must be a positive duration, e.g. 30s or 2m")
    return seconds


def _steps(concurrency: list[int] | None, rate: list[float] | None) -> tuple[Step, ...]:
    if concurrency is not None and rate is not None:
        raise click.UsageError(
            "--concurrency and --rate exclude each other: a step is either a number of "
            "concurrent requests or an arrival rate"
        )
    if rate is not None:
        return tuple(Step("rate", r) for r in rate)
    return tuple(Step("concurrency", c) for c in concurrency or [int(c) for c in DEFAULT_CONCURRENCY.split(",")])


def _request_name(model: str) -> str:
    """A local model folder is asked for by its folder name, as run-model and serve name it."""
    folder = Path(model).expanduser()
    return folder.resolve().name if folder.is_dir() else model


def _api_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise InvalidArgument(
            f"--api-key-env {variable}: that environment variable is not set or empty; export {variable}=... first"
        )
    return key


def _prompts(options: dict[str, Any], model: str) -> PromptSource:
    tokenizer_path = find_tokenizer(model, options["tokenizer"])
    tokenizer = None if tokenizer_path is None else load_tokenizer(tokenizer_path)
    dataset: Path | None = options["dataset"]
    if dataset is not None:
        if options["prompt_tokens"] is not None:
            raise click.UsageError(
                "--prompt-tokens and --dataset exclude each other: the dataset's prompts are sent as they are"
            )
        source = DatasetPrompts(dataset, output_tokens=options["output_tokens"], tokenizer=tokenizer)
        if options["endpoint"] == "completions" and source.has_messages:
            raise InvalidArgument(
                f"--dataset {dataset} has chat messages, which /v1/completions cannot take; use --endpoint chat"
            )
        return source
    return SyntheticPrompts(
        prompt_tokens=options["prompt_tokens"] or DEFAULT_PROMPT_TOKENS,
        output_tokens=options["output_tokens"],
        seed=options["seed"],
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
    )


def _targets(url: str, model: str, options: dict[str, Any]) -> tuple[Target, ...]:
    key = _api_key(options["api_key_env"])
    endpoint = options["endpoint"]
    a = Target("A", normalize_base_url(url), _request_name(model), key, endpoint)
    if options["vs"] is None:
        if options["vs_model"] is not None:
            raise click.UsageError("--vs-model needs --vs URL2")
        return (a,)
    b = Target("B", normalize_base_url(options["vs"]), options["vs_model"] or a.model, key, endpoint)
    return a, b


def stdout_console() -> Console:
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


def _print_summary(report: BenchReport, console: Console) -> None:
    for result in report.results:
        console.print(results_table(result))
        console.print()
    if len(report.results) == 2:
        console.print(comparison_table(*report.results))
        console.print()
    for result in report.results:
        console.print(result.saturation_line(), highlight=False)
    if report.overhead is not None:
        console.print(report.overhead.line(), highlight=False)


@click.command("bench")
@click.argument("url")
@click.option("--model", required=True, help="Model to request; a local model folder also lends its tokenizer.")
@click.option("--concurrency", callback=_positive_ints, help=f"Closed-loop steps [default: {DEFAULT_CONCURRENCY}].")
@click.option("--rate", callback=_positive_numbers, help="Open-loop steps: Poisson arrivals per second, e.g. 1,2,4.")
@click.option("--max-concurrency", type=click.IntRange(min=1), help="With --rate: cap on requests in flight.")
@click.option("--requests", type=click.IntRange(min=1), help="Requests per step [default: max(16, 4 × step)].")
@click.option("--duration", callback=_seconds, help="Time limit per step, e.g. 30s or 2m.")
@click.option(
    "--timeout", "timeout_seconds", default="300", show_default=True, callback=_seconds, help="Time limit per request."
)
@click.option("--prompt-tokens", type=click.IntRange(min=1), help=f"Prompt length [default: {DEFAULT_PROMPT_TOKENS}].")
@click.option(
    "--output-tokens",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="max_tokens per request (a dataset line's max_tokens wins).",
)
@click.option(
    "--dataset",
    type=click.Path(path_type=Path, dir_okay=False),
    help="jsonl with prompt or messages per line, optional max_tokens.",
)
@click.option("--tokenizer", type=click.Path(path_type=Path), help="Tokenizer folder or tokenizer.json.")
@click.option(
    "--endpoint",
    type=click.Choice(["chat", "completions"]),
    default="chat",
    show_default=True,
    help="/v1/chat/completions or /v1/completions.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Uncounted warm-up requests per target, on top of the first one.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of prompts and arrivals.")
@click.option("--ignore-eos", is_flag=True, help="Send vLLM's ignore_eos so every answer has max_tokens tokens.")
@click.option("--api-key-env", metavar="VAR", help="Environment variable holding the API key.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the results here (after every step).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a PNG of latency and throughput per step (needs memserve[plot]).",
)
@click.option("--vs", help="A second server to compare with, run alternately in the same run.")
@click.option("--vs-model", help="Model to request from --vs [default: --model].")
@click.option("--no-overhead", is_flag=True, help="Skip measuring the client's overhead against a local fake.")
def bench(
    url: str,
    model: str,
    concurrency: list[int] | None,
    rate: list[float] | None,
    json_path: Path | None,
    plot_path: Path | None,
    **options: Any,
) -> None:
    """Load-test the OpenAI-compatible server at URL: latency percentiles, throughput, saturation."""
    steps = _steps(concurrency, rate)
    if options["max_concurrency"] is not None and rate is None:
        raise click.UsageError("--max-concurrency applies to --rate steps only")
    if plot_path is not None:
        require_matplotlib()
    config = BenchConfig(
        targets=_targets(url, model, options),
        steps=steps,
        requests_per_step=options["requests"],
        duration_seconds=options["duration"],
        timeout_seconds=options["timeout_seconds"],
        warmup_requests=options["warmup"],
        seed=options["seed"],
        max_concurrency=options["max_concurrency"],
        ignore_eos=options["ignore_eos"],
        measure_overhead=not options["no_overhead"],
        command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    )
    prompts = _prompts(options, model)
    report = _run(config, prompts, json_path)
    _print_summary(report, stdout_console())
    if plot_path is not None:
        write_plot(plot_path, report.results)
        click.echo(f"wrote {plot_path}", err=True)


def _run(config: BenchConfig, prompts: PromptSource, json_path: Path | None) -> BenchReport:
    """Run with a live view on a terminal (plain lines otherwise), saving the JSON after every step."""

    def save(report: BenchReport) -> None:
        if json_path is not None:
            write_json(json_path, report)

    errors = Console(stderr=True)
    try:
        if errors.is_terminal:
            with LiveReporter(errors) as live:
                return _run_with(config, prompts, live, save)
        return _run_with(config, prompts, PlainReporter(lambda line: click.echo(line, err=True)), save)
    finally:
        if json_path is not None and json_path.exists():
            click.echo(f"wrote {json_path}", err=True)


def _run_with(
    config: BenchConfig, prompts: PromptSource, reporter: Reporter, save: Callable[[BenchReport], None]
) -> BenchReport:
    return asyncio.run(run_bench(config, prompts, reporter=reporter, save=save))
