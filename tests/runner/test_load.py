"""How a runner reports its load: JSON lines for the gateway's pipe, a rich display for a person's terminal.

The loads are real (the tiny fp32 demo model on CPU); the terminal is a rich Console writing into a
StringIO with ``force_terminal=True``, and "is stderr a terminal" is a StringIO that says so.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.file_proxy import FileProxy
from transformers.utils import logging as transformers_logging

from memserve.errors import ModelNotFound
from memserve.runner.load import PHASES, LoadReport, load_model
from memserve.runner.progress import LoadProgress, emit
from memserve.wire.events import runner_event_from_json
from tests.runner.fakes import cpu_plan

PLAN = cpu_plan()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class TerminalStream(io.StringIO):
    """A stream that says it is a terminal, as a person's stderr does."""

    def isatty(self) -> bool:
        return True


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=140), out


def plain(text: str) -> str:
    """What a terminal would show of each line: no escape codes, only the text after the last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in ANSI.sub("", text).split("\n"))


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.is_floating_point())


@pytest.mark.parametrize(
    ("tty", "setting", "json_lines", "display"),
    [
        (False, None, True, False),  # the gateway's pipe
        (False, "json", True, False),
        (False, "1", True, False),
        (True, None, False, True),  # a person's terminal
        (True, "1", False, True),
        (True, "0", True, False),
        (True, "off", True, False),
        (True, "json", True, True),
        (True, " JSON ", True, True),
    ],
)
def test_for_stderr_chooses_by_terminal_and_memserve_progress(
    tty: bool, setting: str | None, json_lines: bool, display: bool
) -> None:
    stream = TerminalStream() if tty else io.StringIO()
    env = {} if setting is None else {"MEMSERVE_PROGRESS": setting}
    progress = LoadProgress.for_stderr(stream=stream, env=env)
    assert (progress.json_lines, progress.display) == (json_lines, display)


def test_json_mode_writes_one_json_object_per_line_for_each_phase(tiny_model_dir: Path) -> None:
    stream = io.StringIO()
    report = LoadReport()
    model, _ = load_model(str(tiny_model_dir), PLAN, report, progress=LoadProgress(stream=stream))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["phase"] * len(PHASES)
    assert [e["phase"] for e in events] == list(PHASES)
    assert all(e["seconds"] >= 0 and e["memory"]["cpu"]["rss_bytes"] > 0 for e in events)
    assert events[0]["path"] == str(tiny_model_dir) and events[1]["dtype"] == "float32"
    assert report.state == "ready"
    assert report.phases == [{k: v for k, v in e.items() if k not in ("event", "memory")} for e in events]
    assert weight_bytes(model) > 0


def test_rich_mode_shows_a_row_per_phase_and_no_json(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    console, out = terminal()
    bars_before = transformers_logging.is_progress_bar_enabled()
    model, _ = load_model(
        str(tiny_model_dir), PLAN, LoadReport(), progress=LoadProgress(json_lines=False, console=console)
    )
    text = plain(out.getvalue())
    final = text.split("\n")[-len(PHASES) - 1 :]  # the last render of the rows, then the cursor's line
    for name, row in zip(PHASES, final, strict=False):
        assert row.startswith(f"✓ {name} ") and re.search(r"\d+\.\d\d s$", row.rstrip()), row
    fault_in = final[PHASES.index("fault_in")]
    assert f"{weight_bytes(model) / 1024:.1f} KiB read" in fault_in and "RSS " in fault_in
    assert "{" not in text and '"event"' not in text
    assert "Loading weights" not in text + capsys.readouterr().err  # transformers' own bar stays quiet
    assert transformers_logging.is_progress_bar_enabled() == bars_before
    assert not isinstance(sys.stderr, FileProxy)  # the display gave stderr back


def test_json_setting_on_a_terminal_shows_the_rows_and_the_json_lines(tiny_model_dir: Path) -> None:
    console, out = terminal()
    load_model(str(tiny_model_dir), PLAN, LoadReport(), progress=LoadProgress(json_lines=True, console=console))
    text = plain(out.getvalue())
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert [e["phase"] for e in lines] == list(PHASES)
    assert all(f"✓ {name} " in text for name in PHASES)


def test_a_failed_load_marks_its_phase_and_gives_the_terminal_back(tmp_path: Path) -> None:
    console, out = terminal()
    report = LoadReport()
    with pytest.raises(ModelNotFound):
        load_model(str(tmp_path / "missing"), PLAN, report, progress=LoadProgress(json_lines=False, console=console))
    text = plain(out.getvalue())
    assert "✗ resolve" in text and "failed" in text and "map" not in text
    assert report.phases == [] and report.state == "loading"
    assert not isinstance(sys.stderr, FileProxy)


@pytest.mark.parametrize(
    ("event", "line"),
    [
        ({"event": "listening", "socket": None, "port": 8001}, "listening on http://127.0.0.1:8001"),
        ({"event": "listening", "socket": "/tmp/r.sock", "port": None}, "listening on /tmp/r.sock"),
        (
            {"event": "ready", "model": "tiny", "engine": "generate", "memory": {"cpu": {"rss_bytes": 3 * 2**20}}},
            "ready: tiny on the generate engine, RSS 3.0 MiB",
        ),
        (
            {"event": "engine_fallback", "engine": "generate", "reason": "no paged attention"},
            "engine fallback: serving with generate: no paged attention",
        ),
        ({"event": "phase", "phase": "map", "seconds": 1.5}, "map done in 1.5 s"),
        ({"event": "evicted", "model": "tiny"}, "evicted: model=tiny"),
    ],
)
def test_other_events_are_one_readable_line_on_a_terminal(event: dict[str, Any], line: str) -> None:
    console, out = terminal()
    LoadProgress(json_lines=False, console=console).event(runner_event_from_json(event))
    assert plain(out.getvalue()) == line + "\n"


def test_failed_event_is_left_to_the_cli_on_a_terminal() -> None:
    console, out = terminal()
    LoadProgress(json_lines=False, console=console).event(runner_event_from_json({"event": "failed", "error": "boom"}))
    assert out.getvalue() == ""


def test_emit_on_a_pipe_writes_the_exact_json_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEMSERVE_PROGRESS", "1")
    event = {"event": "listening", "socket": None, "port": 8001}
    emit(runner_event_from_json(event))
    assert capsys.readouterr().err == json.dumps(event) + "\n"


def test_emit_on_a_terminal_writes_a_readable_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = TerminalStream()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("MEMSERVE_PROGRESS", raising=False)
    emit(runner_event_from_json({"event": "listening", "socket": None, "port": 8001}))
    assert plain(stream.getvalue()) == "listening on http://127.0.0.1:8001\n"
