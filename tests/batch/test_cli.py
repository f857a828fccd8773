"""``memserve batch``: bad input said before anything runs, the lock, NoFit before a load, --local, --detach with
status, stop and list from another process, and resuming after a stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from memserve.batch.checkpoint import Checkpoint, count_lines, progress_path_for
from memserve.cli import main
from memserve.cli.fit import EXIT_NO_FIT
from memserve.wire.fake import FakeOpenAI, Script
from tests.batch.conftest import answers, memserve, read_lines, write_input
from tests.serving import nothing_listening, serve_fake


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with serve_fake(FakeOpenAI(models=("tiny",))) as served:
        yield served


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["batch", *args])
    return result.exit_code, result.output


def test_a_file_with_bad_lines_is_refused_before_any_request(tmp_path: Path, fake: FakeOpenAI) -> None:
    path = write_input(tmp_path / "in.jsonl", 20)
    lines = path.read_text().splitlines()
    lines[3] = "{oops"
    lines[11] = lines[0]  # a duplicate of q0
    path.write_text("\n".join(lines) + "\n")
    code, output = invoke("run", str(path), "-o", str(tmp_path / "out.jsonl"), "--url", fake.base_url)
    assert code == 1
    assert output.startswith("error: ")
    assert "2 bad line(s) of 20" in output
    assert "line 4: not valid JSON" in output and "line 12: duplicate custom_id 'q0' (first on line 1)" in output
    assert fake.requests == []
    assert not (tmp_path / "out.jsonl").exists()


def test_a_second_run_on_the_same_output_refuses_naming_the_first(tmp_path: Path, fake: FakeOpenAI) -> None:
    path = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    with Checkpoint(out):
        code, output = invoke("run", str(path), "-o", str(out), "--url", fake.base_url)
    assert code == 1
    assert "another `memserve batch run` (pid " in output
    assert fake.requests == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --url (a server to send to) or --local"),
        (["--url", "http://x", "--local", "m"], "give --url (a server to send to) or --local"),
        (["--url", "http://x", "--memory", "cpu=1GiB"], "apply to --local only"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    path = write_input(tmp_path / "in.jsonl", 1)
    code, output = invoke("run", str(path), "-o", str(tmp_path / "out.jsonl"), *args)
    assert code == 2 and message in output


def test_a_local_model_that_cannot_fit_is_refused_before_it_loads(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_input(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out.jsonl"
    code, output = invoke("run", str(path), "-o", str(out), "--local", str(tiny_model_dir), "--memory", "cpu=1MiB")
    assert code == EXIT_NO_FIT
    assert output.startswith("no fit: ")
    assert not out.exists()


def test_local_starts_a_runner_planned_like_run_model_and_gets_the_runners_text(
    tmp_path: Path, tiny_model_dir: Path, runner_url: str
) -> None:
    path = write_input(tmp_path / "in.jsonl", 12, model="anything")  # --local names the model itself
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    local_run = memserve("batch", "run", str(path), "-o", str(local), "--local", str(tiny_model_dir),
                         "--model", "tiny", "--memory", "cpu=4GiB", "--context", "256")  # fmt: skip
    assert local_run.wait(timeout=300) == 0
    assert memserve("batch", "run", str(path), "-o", str(remote), "--url", runner_url, "--model", "tiny").wait(60) == 0
    assert answers(local) == answers(remote)
    progress = json.loads(progress_path_for(local).read_text())
    assert progress["state"] == "completed" and progress["done"] == 12
    assert progress["target"] == f"local:{tiny_model_dir}"


class Gate:
    """The fake's injected sleep: the first ``free`` answers pass, the rest wait until ``open`` is set."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.open = threading.Event()

    async def __call__(self, seconds: float) -> None:
        self.free -= 1
        while self.free < 0 and not self.open.is_set():
            await asyncio.sleep(0.01)


def wait_for(check: object, what: str, timeout_seconds: float = 60) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_detach_then_status_stop_list_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSERVE_DATA_DIR", str(tmp_path / "data"))
    gate = Gate(free=3)
    path = write_input(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out.jsonl"
    with serve_fake(FakeOpenAI(models=("tiny",), sleep=gate, script=Script(answer_delay_seconds=0.001))) as fake:
        code, output = invoke("run", str(path), "-o", str(out), "--url", fake.base_url, "--concurrency", "2",
                              "--detach")  # fmt: skip
        assert code == 0, output
        job_id = output.splitlines()[0]
        assert job_id.startswith("batch_")
        wait_for(lambda: count_lines(out) == 3, "the three answers the gate lets through")
        wait_for(lambda: json.loads(invoke("status", job_id, "--json")[1]).get("done") == 3, "status")

        code, output = invoke("status", job_id, "--json")
        status = json.loads(output)
        assert status["state"] == "running" and status["job_id"] == job_id
        assert status["succeeded_lines"] == 3 and status["total"] == 10
        code, output = invoke("list", "--json")
        [listed] = json.loads(output)
        assert listed["id"] == job_id and listed["state"] == "running" and listed["done"] == 3

        code, output = invoke("stop", job_id)
        assert code == 0 and f"stopped {job_id}" in output and "resume it with: " in output
        status = json.loads(invoke("status", str(out), "--json")[1])
        assert status["state"] == "stopped" and status["pid"] is None and status["done"] == 3

        gate.open.set()
        resumed = memserve("batch", "run", str(path), "-o", str(out), "--url", fake.base_url)
        assert resumed.wait(timeout=60) == 0
    ids = [line["custom_id"] for line in read_lines(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(10))
    assert json.loads(invoke("status", job_id, "--json")[1])["state"] == "completed"


def test_sigterm_stops_a_foreground_run_cleanly(tmp_path: Path) -> None:
    gate = Gate(free=2)
    path = write_input(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    with serve_fake(FakeOpenAI(models=("tiny",), sleep=gate, script=Script(answer_delay_seconds=0.001))) as fake:
        process = memserve("batch", "run", str(path), "-o", str(out), "--url", fake.base_url, "--concurrency", "1")
        wait_for(lambda: count_lines(out) == 2, "two answers")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
        gate.open.set()
    assert json.loads(progress_path_for(out).read_text())["state"] == "stopped"


def test_local_restarts_a_runner_killed_mid_batch_and_finishes_every_request(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    path = write_input(tmp_path / "in.jsonl", 30)
    out = tmp_path / "out.jsonl"
    process = memserve("batch", "run", str(path), "-o", str(out), "--local", str(tiny_model_dir), "--model", "tiny",
                       "--memory", "cpu=4GiB", "--context", "256", "--concurrency", "2")  # fmt: skip
    try:
        wait_for(lambda: count_lines(out) >= 5, "five answers", timeout_seconds=240)
        progress = json.loads(progress_path_for(out).read_text())
        first_runner = progress["runner_pid"]
        os.kill(first_runner, signal.SIGKILL)
        assert process.wait(timeout=300) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert sorted(answers(out)) == sorted(f"q{i}" for i in range(30))
    assert count_lines(tmp_path / "out.errors.jsonl") == 0
    progress = json.loads(progress_path_for(out).read_text())
    assert progress["runner_restarts"] == 1 and progress["runner_pid"] != first_runner
    assert progress["runner_peak_memory_bytes"] > 0


def test_requests_that_failed_because_the_gateway_was_down_run_again_on_a_rerun(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    """Connection refused on every try sends the requests to the errors file; that is not final: the same command
    run again (the gateway up now) retries them, says so, and each id ends in the output once."""
    path = write_input(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    errors = tmp_path / "out.errors.jsonl"
    with nothing_listening() as down:
        code, output = invoke("run", str(path), "-o", str(out), "--url", down, "--max-retries", "0")
    assert code == 0 and "6 failed this run" in output, output
    assert sorted(line["custom_id"] for line in read_lines(errors)) == [f"q{i}" for i in range(6)]
    assert all(line["error"]["code"] == "upstream_unavailable" for line in read_lines(errors))
    assert fake.requests == []
    code, output = invoke("run", str(path), "-o", str(out), "--url", fake.base_url)
    assert code == 0, output
    assert "retrying 6 requests that failed last time" in output
    assert sorted(answers(out)) == [f"q{i}" for i in range(6)]
    assert read_lines(errors) == [] and len(fake.requests) == 6
    assert json.loads(progress_path_for(out).read_text())["retrying_earlier"] == 6
