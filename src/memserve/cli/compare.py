"""``memserve compare``: one question set through several models of a gateway, and a report."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from rich.console import Console

from memserve.batch.execute import Progress
from memserve.batch.run import RunView
from memserve.cli.batch import LiveDisplay, PlainDisplay
from memserve.compare import questions as question_files
from memserve.compare.questions import read_questions
from memserve.compare.report import model_report, plot_report, table, write_report
from memserve.compare.run import Compare, run_compare
from memserve.compare.scorers import SCORERS, load_scorer

TABLE_WIDTH = 150  # when stdout is a file or pipe (rich's default there is 80 columns, too narrow for it)


@click.command("compare")
@click.argument("questions", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--model", "models", multiple=True, help="A model the gateway serves; give it once per model.")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The memserve gateway.")
@click.option(
    "--scorer",
    default="contains",
    show_default=True,
    help=f"How an answer is judged: {', '.join(SCORERS)}, or module:function (your callable).",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("compare-report"),
    show_default=True,
    help="Folder for the outputs (the checkpoint: run again to resume) and report.{json,csv,png}.",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True, help="Requests in flight.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Per answer.")
@click.option("--max-retries", type=click.IntRange(min=0), default=5, show_default=True, help="Of a transient failure.")
@click.option("--api-key", envvar="MEMSERVE_API_KEY", default=None, help="Key for --url [default: $MEMSERVE_API_KEY].")
@click.option("--no-plot", is_flag=True, help="Skip report.png (it needs matplotlib: pip install 'memserve[plot]').")
@click.option(
    "--make-questions",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Instead: write N generated questions to QUESTIONS (a set to try the pipeline on demo models).",
)
def compare(
    questions: Path,
    models: tuple[str, ...],
    url: str,
    scorer: str,
    report_dir: Path,
    concurrency: int,
    max_tokens: int,
    max_retries: int,
    api_key: str | None,
    no_plot: bool,
    make_questions: int | None,
) -> None:
    """Run every question of QUESTIONS (.jsonl: id, prompt or messages, answer) through each --model, one
    model at a time, resumably, and report success, latency, tokens/s, memory and load time."""
    console = Console(stderr=True, soft_wrap=True)
    if make_questions is not None:
        question_files.write_questions(question_files.make_questions(make_questions), questions)
        console.print(f"wrote {make_questions} questions to {questions} (score them with --scorer contains)")
        return
    if not models:
        raise click.UsageError("give at least one --model")
    judge = load_scorer(scorer)  # a bad scorer is said before any model loads
    job = Compare(questions, models, url, report_dir, concurrency, max_tokens, max_retries, api_key)

    display = _Display(console)
    try:
        asyncio.run(run_compare(job, on_note=display.note, on_progress=display.update))
    except KeyboardInterrupt:
        display.stop()
        console.print(f"stopped; run the same command to resume (the answers so far are in {report_dir / 'outputs'})")
        raise SystemExit(130) from None
    display.stop()
    parsed = read_questions(questions)
    rows = [model_report(m, parsed, report_dir, judge) for m in models]
    paths = write_report(rows, report_dir, scorer=scorer, questions=questions)
    if not no_plot:
        paths["png"] = plot_report(rows, report_dir / "report.png")
    out = Console()
    (out if out.is_terminal else Console(width=TABLE_WIDTH)).print(table(rows))
    console.print("report: " + ", ".join(str(p) for p in paths.values()), highlight=False)


class _Display:
    """The batch command's progress display (a bar on a terminal, a line every few seconds otherwise), a new
    one for each model; notes go through the display that is showing, so they never tear its bar."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.model: str | None = None
        self.shown: LiveDisplay | PlainDisplay | None = None

    def note(self, text: str) -> None:
        if self.shown is not None:
            self.shown.note(text)
        else:
            self.console.print(text, highlight=False)

    def update(self, model: str, progress: Progress) -> None:
        if model != self.model:
            self.stop()
            self.model = model
            self.shown = LiveDisplay(self.console, label=model) if self.console.is_terminal else PlainDisplay()
            self.shown.start()
        assert self.shown is not None
        self.shown.update(progress, RunView())

    def stop(self) -> None:
        if self.shown is not None:
            self.shown.stop()
        self.shown, self.model = None, None
