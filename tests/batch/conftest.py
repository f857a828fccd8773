"""Batch test helpers: input files, a real runner on the tiny demo model, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.memory.fit import fit_json, fit_result
from memserve.memory.probe import probe_inventory

RUNNER_NAME = "tiny"


def write_input(path: Path, count: int, *, model: str = RUNNER_NAME, max_tokens: int = 4) -> Path:
    """``count`` greedy chat requests, ids q0…, prompts that differ so their answers do."""
    with path.open("w") as out:
        for i in range(count):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"tell me about the number {i} and {i * 7 % 13}"}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            out.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            out.write("\n")
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in path.read_bytes().splitlines()] if path.exists() else []


def answers(path: Path) -> dict[str, str]:
    """custom_id → the answer's text, asserting each id appears once."""
    lines = read_lines(path)
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), f"an id appears twice in {path}"
    return {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in lines}


def memserve(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
    """``memserve ARGS`` in a child process (this interpreter), so a test can kill -9 it."""
    return subprocess.Popen(
        [sys.executable, "-m", "memserve", *args],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runner_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real runner (``python -m memserve.runner``) on the tiny fp32 demo model, named ``tiny``; its base URL."""
    inventory = probe_inventory(memory="cpu=4GiB")
    facts, request, result = fit_result(str(tiny_model_dir), context=256, concurrency=16, inventory=inventory)
    assert result.plan is not None
    folder = tmp_path_factory.mktemp("runner")
    plan_file = folder / "plan.json"
    plan_file.write_text(json.dumps(fit_json(facts, request, result, inventory)))
    port = _free_port()
    log = folder / "runner.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memserve.runner",
                "--plan",
                str(plan_file),
                "--port",
                str(port),
                "--name",
                RUNNER_NAME,
            ],
            stderr=err,
            stdout=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"runner exited with {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"runner not ready in 120 s: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
