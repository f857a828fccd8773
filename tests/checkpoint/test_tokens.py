"""The gateway's count of a prompt before any load (``prompt_tokens_at_least``) is a bound from below: never more
than the tokens the runner's chat template and tokenizer really make of the same messages, or a prompt that fits
would be refused at the door."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from memserve.checkpoint.tokens import prompt_tokens_at_least, tokenizer_file

PIECES = [
    "the", "cat", "sat", "on", "a", "mat", "Hello", "world", "!", "?", ",", ".", "...", "don't", "e.g.", "42", "3.14",
    "naïve", "café", "你好", "世界", "🙂", "👍🏽", "<b>", "</b>", "{", "}", "\"", "'", "-", "--", "_x_", "URL:",
    "https://example.com/a?b=c", "\t", "\n", "\n\n", "  ", "<|im_start|>", "<s>", "[INST]", "user", "assistant",
]  # fmt: skip


def _text(rng: random.Random) -> str:
    glue = [" ", "", "\n", "  "]
    parts = [rng.choice(PIECES) for _ in range(rng.randint(0, 40))]
    text = "".join(p + rng.choice(glue) for p in parts)
    return rng.choice(["", " ", "\n"]) + text if rng.random() < 0.3 else text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_bound_never_passes_what_the_chat_template_and_tokenizer_make(
    arch: str, request: pytest.FixtureRequest
) -> None:
    from transformers import AutoTokenizer

    folder = Path(request.getfixturevalue("tiny_model_dir" if arch == "llama" else "tiny_qwen_dir"))
    counter = tokenizer_file(folder)
    assert counter is not None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(7)
    for _ in range(400):
        roles = ["system", "user", "assistant", "user"][: rng.randint(1, 4)]
        messages = [{"role": role, "content": _text(rng)} for role in roles]
        real = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        bound = prompt_tokens_at_least(counter, [m["content"] for m in messages])
        assert bound <= real, (messages, bound, real)
        prompt = _text(rng)
        assert prompt_tokens_at_least(counter, [prompt]) <= len(tokenizer(prompt)["input_ids"]), prompt
    # and one that counts: on a long prompt (what it is for) it is most of the real count, not a token or two
    long = [{"role": "user", "content": " ".join(_text(rng) for _ in range(60))} for _ in range(2)]
    real = len(tokenizer.apply_chat_template(long, add_generation_prompt=True, tokenize=True)["input_ids"])
    bound = prompt_tokens_at_least(counter, [m["content"] for m in long])
    assert real > 1000 and 0.95 * real <= bound <= real, (bound, real)
