"""Both engines in-process, driven token by token: an adapter removed while one of its sequences is in flight
serves that sequence to its end, unchanged, and refuses new ones at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from memserve.errors import ModelNotFound
from memserve.runner.engine import ContinuousBatchingEngine, GenerateEngine
from memserve.runner.lora import LoraBank
from memserve.wire.events import GenerationRequest
from tests.adapters.conftest import peft_greedy

PROMPT = (5, 6, 7, 8, 9, 10)


@pytest.mark.parametrize("engine_name", ["continuous-batching", "generate"])
def test_an_adapter_removed_mid_sequence_finishes_it_and_refuses_new_ones(
    engine_name: str, tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    bank = LoraBank(model)
    bank.add("ad1", adapter_dirs["ad1"])
    sizes = {"max_sequences": 2, "max_queue": 0, "max_context_tokens": 128, "max_batch_tokens": 64}
    engine = (
        ContinuousBatchingEngine(model, **sizes)
        if engine_name == "continuous-batching"
        else GenerateEngine(model, **sizes)
    )
    engine.attach_lora(bank)
    expected = peft_greedy(tiny_model_dir, adapter_dirs["ad1"], [list(PROMPT)], 24)[0]
    request = GenerationRequest("r", PROMPT, max_new_tokens=24, stop_token_ids=(-1,), adapter="ad1")

    async def run() -> list[int]:
        try:
            events = engine.generate(request)
            tokens = [(await anext(events)).token_id]  # in flight: the adapter is held until the sequence ends
            bank.remove("ad1")
            with pytest.raises(ModelNotFound, match="no adapter named ad1"):
                await anext(engine.generate(GenerationRequest("s", PROMPT, max_new_tokens=2, adapter="ad1")))
            assert bank.weights_bytes > 0
            tokens += [event.token_id async for event in events]
            return tokens
        finally:
            await engine.close()

    assert asyncio.run(run()) == expected
    assert bank.weights_bytes == 0 and bank.names() == []  # dropped with its last sequence
