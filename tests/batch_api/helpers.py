"""What the batch API tests share: input lines, an upload, polling a batch, reading JSONL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import openai
from openai.types import Batch, FileObject


def batch_lines(
    custom_ids: Iterable[str], *, model: str, url: str = "/v1/chat/completions", max_tokens: int = 4
) -> list[bytes]:
    lines = []
    for custom_id in custom_ids:
        if url == "/v1/chat/completions":
            body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": f"say {custom_id}"}]}
        else:
            body = {"model": model, "prompt": f"say {custom_id}"}
        body.update(max_tokens=max_tokens, temperature=0)
        line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
        lines.append(json.dumps(line).encode() + b"\n")
    return lines


def upload(client: openai.OpenAI, lines: list[bytes], name: str = "input.jsonl") -> FileObject:
    return client.files.create(file=(name, b"".join(lines)), purpose="batch")


def wait_for(
    client: openai.OpenAI, batch_id: str, until: set[str] | Callable[[Batch], bool], *, seconds: float = 120
) -> Batch:
    """Poll the batch (as a client script does) until its status is in ``until``, or ``until(batch)`` holds."""
    deadline = time.monotonic() + seconds
    while True:
        batch = client.batches.retrieve(batch_id)
        if (batch.status in until) if isinstance(until, set) else until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} did not get there in {seconds:g} s: {batch}"
        time.sleep(0.05)


def read_jsonl(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content.splitlines() if line.strip()]
