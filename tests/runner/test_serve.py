"""The runner's loading happens off the main thread (see ``on_worker_thread`` for why)."""

from __future__ import annotations

import threading

import pytest

from memserve.runner.serve import on_worker_thread


def test_work_runs_on_another_thread_that_has_ended_when_it_returns() -> None:
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert on_worker_thread(work) == 42
    assert seen[0] is not threading.main_thread()
    assert seen[0].name == "memserve-load"
    assert not seen[0].is_alive()  # its OpenMP team is back in libgomp's pool


def test_an_exception_in_the_work_is_raised_in_the_caller() -> None:
    def work() -> None:
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        on_worker_thread(work)
