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


def peft_greedy(
    model_dir: Path, adapter: Path | None, prompts: list[list[int]], max_new_tokens: int, *, merge: bool = False
) -> list[list[int]]:
    """The new tokens ``generate`` gives greedily, one prompt at a time, on the base with ``adapter`` loaded by PEFT
    (merged into the weights with ``merge_and_unload`` when ``merge``), or on the base alone.

    Unmerged, PEFT computes ``base(x) + scale · B(A(x))`` as the runner does; merged, ``(W + scale · BA) x`` rounds
    differently, and on a random demo model two logits can tie to 1e-5, so over many tokens a greedy answer may
    part from the unmerged one at such a tie (seen once in 16 tokens × 20 answers). The runner's tests compare with
    the unmerged model; ``test_lora`` checks the merged one where no tie occurs."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5.24 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs
