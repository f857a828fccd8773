"""RunnerProcess pieces that need no model: what its memory sample reads."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Collection
from pathlib import Path

from memserve.pool.runner_process import RunnerProcess


def test_sample_memory_is_the_trees_rss_plus_its_gpu_memory(tmp_path: Path) -> None:
    asked: list[set[int]] = []

    def gpu_memory(pids: Collection[int]) -> dict[str, int]:
        asked.append(set(pids))
        return {"cuda:0": 3 << 30}

    async def scenario() -> None:
        runner = RunnerProcess("m", "/models/m", {}, run_dir=tmp_path, gpu_memory=gpu_memory)
        assert runner.sample_memory() == {}  # not started: nothing to read
        # a stand-in process tree: a parent that started a child (the runner and, say, a compile worker)
        child_code = ("import subprocess, sys, time; "
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)")
        runner._proc = await asyncio.create_subprocess_exec(sys.executable, "-c", child_code,
                                                            start_new_session=True)  # as start() does
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
