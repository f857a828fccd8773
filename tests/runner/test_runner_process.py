"""A real runner process on the tiny fp32 demo model: greedy equality with generate, the openai client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import runner_process

PROMPTS = [
    "hello there",
    "what is memory?",
    "tell me a story about a cat",
    "count to five",
    "why is the sky blue",
    "name three rivers",
    "a b c d",
    "the quick brown fox",
]


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``python -m memserve.runner`` with a plan from ``fit --json``; yield its base URL."""
    folder = tmp_path_factory.mktemp("runner")
    with runner_process(
        tiny_model_dir, folder, name="tiny", context=512, concurrency=8, env={"OMP_NUM_THREADS": "1"}
    ) as base:
        yield base
    log = folder / "runner.log"
    phases = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [p["phase"] for p in phases if p.get("event") == "phase"] == [
        "resolve",
        "map",
        "fault_in",
        "warm_up",
        "worst_case",
    ]


def greedy_reference(
    model_dir: Path, prompts: list[str], max_new_tokens: int, quantization: str | None = None
) -> list[list[int]]:
    """The token ids ``model.generate`` gives greedily in this process (its Linears quantized as the runner's
    CPU rungs quantize them, with ``quantization``): what a runner must answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if quantization:
        from memserve.runner.quantize import quantize_linears

        quantize_linears(model, quantization)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    outputs = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(out[0, ids["input_ids"].shape[1] :].tolist())
    return outputs


def _decode(model_dir: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def test_health_reports_plan_phases_and_memory(runner: str) -> None:
    health = httpx.get(f"{runner}/health").json()
    assert health["state"] == "ready"
    assert health["plan"]["rung"] == "cpu" and health["plan"]["concurrency"] == 8
    cpu = health["memory"]["cpu"]
    assert cpu["anon_bytes"] > 0 and cpu["file_bytes"] > 0
    assert [p["phase"] for p in health["load"]["phases"]] == ["resolve", "map", "fault_in", "warm_up", "worst_case"]
    stats = httpx.get(f"{runner}/stats").json()
    assert {"running", "waiting"} <= set(stats)


def test_eight_concurrent_streams_equal_generate(runner: str, tiny_model_dir: Path) -> None:
    """Greedy fp32: each stream's text is the decoded text of model.generate, token for token."""
    max_new = 24
    expected = [_decode(tiny_model_dir, ids) for ids in greedy_reference(tiny_model_dir, PROMPTS, max_new)]

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[str, dict]:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_new,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        text, usage = "", {}
        async with client.stream("POST", f"{runner}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
        return text, usage

    async def all_at_once() -> list[tuple[str, dict]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    results = asyncio.run(all_at_once())
    assert [text for text, _ in results] == expected
    assert all(usage["completion_tokens"] <= max_new and usage["prompt_tokens"] > 0 for _, usage in results)


def test_official_openai_client_chat_and_completions(runner: str, tiny_model_dir: Path) -> None:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{runner}/v1", api_key="unused", max_retries=0) as client:
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=16, temperature=0
        )
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage is not None and chat.usage.completion_tokens > 0
        expected = _decode(tiny_model_dir, greedy_reference(tiny_model_dir, PROMPTS[:1], 16)[0])
        assert chat.choices[0].message.content == expected
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=16,
                temperature=0,
                stream=True,
            )
            if c.choices
        )
        assert streamed == expected
        completion = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=8, temperature=0)
        assert completion.choices[0].text and completion.usage is not None
        pieces = list(
            client.completions.create(model="tiny", prompt="the quick brown", max_tokens=8, temperature=0, stream=True)
        )
        assert "".join(p.choices[0].text for p in pieces if p.choices) == completion.choices[0].text
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x " * 2000}], max_tokens=4
            )
    assert httpx.get(f"{runner}/health").json()["state"] == "ready"  # still up after bad input
