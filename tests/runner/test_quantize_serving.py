"""A real runner serving the tiny demo model on the cpu-int8 and cpu-4bit rungs: greedy text, usage, the plan."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from memserve.runner.quantize import int8_kernel
from tests.runner.test_runner_process import PROMPTS, _decode, greedy_reference
from tests.serving import runner_process

MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["int8", "4bit"])
def quantized_runner(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict]]:
    """A real runner on the plan ``fit --quantization Q --json`` writes; its URL and that plan."""
    folder = tmp_path_factory.mktemp(f"runner-{request.param}")
    with runner_process(
        tiny_model_dir,
        folder,
        name="tiny",
        context=512,
        concurrency=2,
        quantization=request.param,
        env={"OMP_NUM_THREADS": "1"},
    ) as base:
        plan = json.loads((folder / "plan.json").read_text())["plan"]
        assert plan["rung"] == f"cpu-{request.param}"
        yield base, plan


def test_the_quantized_rung_serves_greedy_text_with_usage(
    quantized_runner: tuple[str, dict], tiny_model_dir: Path
) -> None:
    base, plan = quantized_runner
    health = httpx.get(f"{base}/health").json()
    assert health["plan"]["rung"] == plan["rung"] and health["plan"]["quantization"] == plan["quantization"]
    quantized = health["load"]["linear"]["quantized"]
    assert quantized["quantization"] == plan["quantization"] and quantized["layers"] == 14 and quantized["kept"] == {}
    if plan["quantization"] == "int8":  # the kernel this machine's check chose, and why
        assert (quantized["kernel"], quantized["kernel_reason"]) == int8_kernel({})
    expected = [
        _decode(tiny_model_dir, ids)
        for ids in greedy_reference(tiny_model_dir, PROMPTS[:2], MAX_NEW_TOKENS, plan["quantization"])
    ]
    for prompt, text in zip(PROMPTS[:2], expected, strict=True):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0,
        }
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
        assert answer["choices"][0]["message"]["content"] == text
        usage = answer["usage"]
        assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= MAX_NEW_TOKENS


def test_the_quantized_plan_holds_the_measured_peak(quantized_runner: tuple[str, dict]) -> None:
    """The worst-case warm-up (the largest prefill, every KV page) peaked within the plan's estimate."""
    base, plan = quantized_runner
    health = httpx.get(f"{base}/health").json()
    check = health["load"]["plan_check"]
    planned = plan["devices"]["cpu"]["total_bytes"]
    assert check["fits"] and check["sequences"] == plan["concurrency"], check
    assert check["peak_bytes"]["cpu"] <= planned
    assert health["memory"]["cpu"]["peak_rss_bytes"] <= planned
