"""Batch test helpers: input files, a real runner on the tiny demo model, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving import runner_process

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


@pytest.fixture(scope="module")
def runner_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real runner (``python -m memserve.runner``) on the tiny fp32 demo model, named ``tiny``; its base URL."""
    folder = tmp_path_factory.mktemp("runner")
    with runner_process(tiny_model_dir, folder, name=RUNNER_NAME, context=256, concurrency=16) as base:
        yield base
