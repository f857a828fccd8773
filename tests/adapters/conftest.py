"""Demo LoRA adapters on the tiny fp32 demo model, built once per session with ``write_demo_adapter`` (PEFT)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memserve.checkpoint.demo_adapter import write_demo_adapter

# (name, seed, targets): four adapters that differ in seed and in the modules they adapt
ADAPTERS = (
    ("ad1", 1, ("q_proj", "v_proj")),
    ("ad2", 2, ("q_proj", "v_proj", "down_proj")),
    ("ad3", 3, ("k_proj", "o_proj", "gate_proj", "up_proj")),
    ("ad4", 4, ("q_proj", "v_proj")),
)


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four adapters for the tiny Llama demo model, by name (the folder's name). Read them; do not write."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: write_demo_adapter(tiny_model_dir, root / name, seed=seed, targets=targets).path
        for name, seed, targets in ADAPTERS
    }


def merged_greedy(
    model_dir: Path, adapter: Path | None, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """The new tokens ``generate`` gives greedily, one prompt at a time, on the base with ``adapter`` merged into it
    by PEFT (``merge_and_unload``), or on the base alone: what the runner must answer through that adapter."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5.24 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs
