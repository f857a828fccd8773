"""Issue 15's acceptance test: ``kill -9`` of ``memserve batch run`` at random points, resumed each time, ends
with every custom_id in the output exactly once and the same greedy text as a run that was never killed."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

from memserve.batch.checkpoint import count_lines, errors_path_for, lock_holder
from tests.batch.conftest import answers, memserve, write_input

REQUESTS = 300
CONCURRENCY = 16
MIN_KILLS = 10


def run_batch(input_path: Path, output: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return memserve(
            "batch", "run", str(input_path), "--output", str(output), "--url", url,
            "--concurrency", str(CONCURRENCY), stdout=sink, stderr=sink,
        )  # fmt: skip


def test_kill_9_at_random_points_then_resume_gives_each_id_once_with_the_clean_text(
    runner_url: str, tmp_path: Path
) -> None:
    input_path = write_input(tmp_path / "in.jsonl", REQUESTS)
    log = tmp_path / "cli.log"

    clean = tmp_path / "clean.jsonl"
    assert run_batch(input_path, clean, runner_url, log).wait(timeout=600) == 0, log.read_text()[-3000:]
    expected = answers(clean)
    assert len(expected) == REQUESTS

    rng = random.Random(15)
    output = tmp_path / "killed.jsonl"
    kills, starts = 0, 0
    while True:
        done = count_lines(output)
        # the next kill: a few results further on, sometimes right at start-up (before the first new result)
        target = done + rng.choice([0, *range(1, 2 * REQUESTS // (MIN_KILLS + 5))])
        process = run_batch(input_path, output, runner_url, log)
        starts += 1
        if target == done:  # right after it took the lock and read what is done, before any new result
            while process.poll() is None and lock_holder(output) != process.pid:
                time.sleep(0.005)
        else:
            while process.poll() is None and count_lines(output) < target:
                time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
            kills += 1
            continue
        assert process.returncode == 0, log.read_text()[-3000:]
        break

    assert kills >= MIN_KILLS, f"only {kills} kills in {starts} starts; the run finished too soon"
    assert count_lines(errors_path_for(output)) == 0, errors_path_for(output).read_text()[:2000]
    got = answers(output)  # asserts each id is there once
    assert got == expected
