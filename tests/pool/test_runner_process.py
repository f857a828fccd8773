"""RunnerProcess pieces that need no model: what its memory sample reads, and the run folders."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import psutil
import pytest

from memserve.pool import runner_process
from memserve.pool.runner_process import (
    RUN_DIR_OWNER_FILE,
    RUN_DIR_PREFIX,
    RunnerProcess,
    new_run_dir,
    owner_alive,
    owner_record,
    remove_dead_run_dirs,
)
from tests.pool.fake_runner import plan_file


def test_sample_memory_is_the_trees_rss_plus_its_gpu_memory(tmp_path: Path) -> None:
    asked: list[set[int]] = []

    def gpu_memory(pids: Collection[int]) -> dict[str, int]:
        asked.append(set(pids))
        return {"cuda:0": 3 << 30}

    async def scenario() -> None:
        runner = RunnerProcess("m", plan_file("/models/m"), run_dir=tmp_path, gpu_memory=gpu_memory)
        assert runner.sample_memory() == {}  # not started: nothing to read
        # a stand-in process tree: a parent that started a child (the runner and, say, a compile worker)
        child_code = (
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
        )
        runner._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", child_code, start_new_session=True
        )  # as start() does
        try:
            for _ in range(100):
                sample = runner.sample_memory()
                if len(asked[-1]) == 2:
                    break
                await asyncio.sleep(0.05)
            assert sample["cuda:0"] == 3 << 30
            assert sample["cpu"] > 1 << 20  # two Python processes' RSS
            assert runner.pid in asked[-1] and len(asked[-1]) == 2  # the GPU reading covers the whole tree
        finally:
            runner.kill()
            await runner._proc.wait()
        assert runner.sample_memory() == {}  # exited: nothing to read

    asyncio.run(scenario())


# --- run folders ----------------------------------------------------------------------------------------------


def _dead_pid_record() -> dict[str, object]:
    """The owner record of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = owner_record(child.pid)
    child.wait()
    return record


def _run_dir(parent: Path, name: str, record: dict[str, object] | None) -> Path:
    folder = parent / f"{RUN_DIR_PREFIX}{name}"
    folder.mkdir()
    (folder / "m.sock").write_text("")  # what a runner leaves
    if record is not None:
        (folder / RUN_DIR_OWNER_FILE).write_text(json.dumps(record))
    return folder


def test_a_new_run_dir_records_its_owner_and_removes_only_the_dead_owners_folders(tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as living:
        try:
            dead = _run_dir(tmp_path, "dead", _dead_pid_record())
            reused = _run_dir(tmp_path, "reused", {**owner_record(living.pid), "started": 1.0})  # pid reused since
            alive = _run_dir(tmp_path, "alive", owner_record(living.pid))
            ours = _run_dir(tmp_path, "ours", owner_record(os.getpid()))
            elsewhere = _run_dir(tmp_path, "elsewhere", {**_dead_pid_record(), "host": "another-host"})
            unknown = _run_dir(tmp_path, "unknown", None)  # being made right now, or an older memserve's
            garbled = _run_dir(tmp_path, "garbled", None)
            (garbled / RUN_DIR_OWNER_FILE).write_text("{not json")
            not_ours = tmp_path / "other-thing"
            not_ours.mkdir()

            run_dir = new_run_dir(tmp_path)
        finally:
            living.kill()
            living.wait()

    assert not dead.exists() and not reused.exists()
    assert all(p.exists() for p in (alive, ours, elsewhere, unknown, garbled, not_ours))
    assert run_dir.parent == tmp_path and run_dir.name.startswith(RUN_DIR_PREFIX)
    record = json.loads((run_dir / RUN_DIR_OWNER_FILE).read_text())
    assert record["pid"] == os.getpid() and owner_alive(record) is True
    assert remove_dead_run_dirs(tmp_path) == [alive]  # its owner has ended now; this process owns the new one


def test_owner_alive_judges_records() -> None:
    assert owner_alive(owner_record(os.getpid())) is True
    assert owner_alive(_dead_pid_record()) is False
    assert owner_alive({**owner_record(os.getpid()), "started": 1.0}) is False  # same pid, another process
    assert owner_alive({**owner_record(os.getpid()), "pid_namespace": "pid:[1]"}) is None  # cannot tell
    assert owner_alive({"pid": "x"}) is None and owner_alive({}) is None


def test_a_process_that_has_not_exec_yet_is_not_measured(tmp_path: Path) -> None:
    """A forked copy shares its parent's pages until it execs: its RSS would count them twice. A runner that
    vforked ``ldconfig`` read as twice its size for a moment and was killed while starting (CI, under load)."""
    pids = tmp_path / "pids.json"
    # the stand-in runner holds 128 MiB, then forks a copy that never execs and starts a child that does
    stand_in = (
        "import json, os, pathlib, subprocess, sys, time\n"
        "held = b'x' * (128 << 20)\n"
        "forked = os.fork()\n"
        "if forked == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "execd = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"pathlib.Path({str(pids)!r}).write_text(json.dumps([forked, execd.pid]))\n"
        "time.sleep(60)\n"
    )

    async def scenario() -> None:
        runner = RunnerProcess("m", plan_file("/models/m"), run_dir=tmp_path, gpu_memory=lambda pids: {})
        runner._proc = await asyncio.create_subprocess_exec(sys.executable, "-c", stand_in, start_new_session=True)
        try:
            while not pids.exists():  # written after the fork, and after the exec'd child's exec
                assert runner._proc.returncode is None, "the stand-in ended before it was up"
                await asyncio.sleep(0.02)
            forked, execd = json.loads(pids.read_text())
            assert runner_process.forked_not_exec(forked)
            assert not runner_process.forked_not_exec(execd) and not runner_process.forked_not_exec(runner._proc.pid)
            root_rss = psutil.Process(runner._proc.pid).memory_info().rss
            forked_rss = psutil.Process(forked).memory_info().rss
            assert forked_rss > 128 << 20  # the copy's RSS shows the parent's pages
            sample = runner.sample_memory()
            assert root_rss < sample["cpu"] < root_rss + forked_rss  # the root and the exec'd child, not the copy

            class _Proc:  # the copy as the runner's own process: a child of the gateway that has not exec'd
                pid = forked
                returncode = None

            runner._proc, stand_in_proc = _Proc(), runner._proc  # type: ignore[assignment]
            assert runner.sample_memory() == {}  # nothing of it is the runner's until it runs the runner
            runner._proc = stand_in_proc
        finally:
            runner.kill()
            await runner._proc.wait()

    asyncio.run(scenario())


@pytest.mark.parametrize("proc_children", [True, False], ids=["proc-children-files", "psutil-walk"])
def test_descendants_finds_grandchildren_as_psutil_does(
    proc_children: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if proc_children and not runner_process._PROC_CHILDREN:
        pytest.skip("this kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
    monkeypatch.setattr(runner_process, "_PROC_CHILDREN", proc_children)
    ready = tmp_path / "ready"
    # a parent, its child and the child's child; the grandchild says when the whole tree is up
    grandchild = f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(30)"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(30)"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"]
    )
    try:
        while not ready.exists():
            assert parent.poll() is None, "the stand-in tree ended before it was up"
            time.sleep(0.02)
        root = psutil.Process(parent.pid)
        found = runner_process.descendants(root)
        assert len(found) == 2
        assert sorted(found) == sorted(p.pid for p in root.children(recursive=True))
    finally:
        for process in [*psutil.Process(parent.pid).children(recursive=True), psutil.Process(parent.pid)]:
            process.kill()
        parent.wait()


def test_descendants_of_a_process_that_ends_while_it_is_read_leaves_nothing_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not runner_process._PROC_CHILDREN:
        pytest.skip("this kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")

    def gone(path: str) -> Any:
        raise FileNotFoundError(2, "No such file or directory", path)  # as when a thread or process just ended

    monkeypatch.setattr(runner_process, "open", gone, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unclosed scandir iterator is a ResourceWarning when collected
        assert runner_process.descendants(psutil.Process(os.getpid())) == []
        gc.collect()
