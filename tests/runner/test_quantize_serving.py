"""A real runner serving the tiny demo model on the cpu-int8 and cpu-4bit rungs: greedy text, usage, the plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from memserve.memory.fit import fit_json, fit_result
from memserve.memory.probe import probe_inventory
from tests.runner.test_runner_process import PROMPTS, _decode, _free_port

MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["int8", "4bit"])
def quantized_runner(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict]]:
    """``python -m memserve.runner`` on the plan ``fit --quantization Q --json`` writes; its URL and that plan."""
    inventory = probe_inventory(memory="cpu=4GiB")
    facts, plan_request, result = fit_result(
        str(tiny_model_dir), context=512, concurrency=2, quantization=request.param, inventory=inventory
    )
    assert result.plan is not None and result.plan.rung == f"cpu-{request.param}"
    fit = fit_json(facts, plan_request, result, inventory)
    plan_file = tmp_path_factory.mktemp("plan") / "plan.json"
    plan_file.write_text(json.dumps(fit))
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "runner.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memserve.runner", "--plan", str(plan_file), "--port", str(port), "--name", "tiny"],
            stderr=err,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"runner exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"runner not ready in 120 s: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base, fit["plan"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _quantized_reference(model_dir: Path, quantization: str, prompts: list[str]) -> list[str]:
    """Greedy text of ``model.generate`` on the same model quantized in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memserve.runner.quantize import quantize_linears

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    quantize_linears(model, quantization)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        texts.append(_decode(model_dir, out[0, ids["input_ids"].shape[1] :].tolist()))
    return texts


def test_the_quantized_rung_serves_greedy_text_with_usage(
    quantized_runner: tuple[str, dict], tiny_model_dir: Path
) -> None:
    base, plan = quantized_runner
    health = httpx.get(f"{base}/health").json()
    assert health["plan"]["rung"] == plan["rung"] and health["plan"]["quantization"] == plan["quantization"]
    quantized = health["load"]["linear"]["quantized"]
    assert quantized["quantization"] == plan["quantization"] and quantized["layers"] == 14 and quantized["kept"] == {}
    expected = _quantized_reference(tiny_model_dir, plan["quantization"], PROMPTS[:2])
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
    assert check["fits"] and check["sequences"] == plan["concurrency"]
    assert check["peak_bytes"]["cpu"] <= planned
    assert health["memory"]["cpu"]["peak_rss_bytes"] <= planned
