"""The estimate's terms as pure functions over facts built from tensor listings (no torch)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memserve.checkpoint.facts import CheckpointFacts, facts_from
from memserve.memory.estimate import (
    FORWARD_BYTES_PER_TOKEN,
    GENERATE,
    HIDDEN_TENSORS,
    KV_PAGE_TOKENS,
    KV_TRASH_PAGES,
    SERVING_BYTES_PER_SEQUENCE,
    activation_bytes,
    attention_bytes,
    attention_types,
    block_weight_bytes,
    generate_attention_bytes,
    kv_cache_bytes,
    mask_bytes,
    paged_tokens,
    tokens_read,
)
from tests.fakes import LLAMA3_8B, MISTRAL_7B, MIXTRAL_8X7B, tensors_for


def facts(config: dict, **extra: object) -> CheckpointFacts:
    return facts_from({**config, **extra}, tensors_for({**config, **extra}), source="m")


@pytest.mark.parametrize(
    ("context", "concurrency", "pages"),
    [
        (64, 1, 2 + KV_TRASH_PAGES),  # one whole page plus one page of slack
        (65, 1, 3 + KV_TRASH_PAGES),  # a token more rounds up to another page
        (1000, 2, 2 * 17 + KV_TRASH_PAGES),
        (2048, 8, 8 * 33 + KV_TRASH_PAGES),
    ],
)
def test_paged_tokens_are_whole_pages_per_sequence_plus_slack_and_trash(
    context: int, concurrency: int, pages: int
) -> None:
    assert paged_tokens(context, concurrency) == pages * KV_PAGE_TOKENS


def test_kv_cache_is_what_the_paged_cache_allocates_for_every_layer() -> None:
    f = facts(LLAMA3_8B)
    per_token = 2 * 32 * 8 * 128 * 2
    assert kv_cache_bytes(f, "bfloat16", 4096, 2) == per_token * (2 * 65 + KV_TRASH_PAGES) * KV_PAGE_TOKENS
    # the paged cache sizes sliding-window layers for the whole context too (transformers 5.24)
    mistral = facts(MISTRAL_7B)
    assert mistral.sliding_window == 4096
    assert kv_cache_bytes(mistral, "bfloat16", 16384, 1) == mistral.kv_bytes_per_token(2) * paged_tokens(16384, 1)


def test_only_sliding_layers_read_at_most_their_window_per_sequence() -> None:
    mistral = facts(MISTRAL_7B)  # every layer slides, window 4,096
    assert tokens_read(mistral, 2048, 8, 2048) == 8 * 2048  # the window is past the context: everything
    assert tokens_read(mistral, 2048, 8, 16384) == 8 * 4095 + 2048  # each its window's last 4,095, plus the chunk
    assert tokens_read(mistral, 8, 8, 16384) == 8 * 4095 + 8  # decode: one new token each
    gemma2 = replace(facts(LLAMA3_8B), sliding_window=4096, sliding_window_layers=16)  # its full layers read all
    assert tokens_read(gemma2, 2048, 8, 16384) == 8 * 16384
    llama = facts(LLAMA3_8B)
    assert attention_bytes(mistral, "bfloat16", 2048, 8, 16384) < attention_bytes(
        replace(mistral, sliding_window=None, sliding_window_layers=0), "bfloat16", 2048, 8, 16384
    )
    assert tokens_read(llama, 2048, 8, 16384) == 8 * 16384


def test_masks_one_per_attention_type() -> None:
    f = facts(LLAMA3_8B)
    assert attention_types(f) == 1
    assert attention_types(facts(MISTRAL_7B)) == 1  # every layer slides: one group
    mixed = replace(f, sliding_window=4096, sliding_window_layers=16)  # Gemma2: alternating layers
    assert attention_types(mixed) == 2
    data = 8 * 33 * KV_PAGE_TOKENS  # the data pages' tokens (no trash pages)
    assert mask_bytes(f, "bfloat16", 2048, 8, 2048) == 2048 * (data + 2048) * 2
    # two groups cut the cache into sectors of one group's page: each group's mask spans twice the tokens
    assert mask_bytes(mixed, "bfloat16", 2048, 8, 2048) == 2 * 2048 * (2 * data + 2048) * 2
    # the Gemma2 family checkpoint at 2048 × 4 in fp32: two masks of 2,048 × 18,944 (measured)
    assert mask_bytes(mixed, "float32", 2048, 4, 2048) == 2 * 2048 * 18944 * 4


def test_attention_gathers_every_read_token_and_repeats_it_only_for_gqa() -> None:
    gqa = facts(LLAMA3_8B)  # 32 heads, 8 KV heads, head_dim 128
    query = 512 * 32 * 128 * 2 * 2
    gathered = 2 * 4 * 1024 * 8 * 128 * 2
    repeated = 2 * 4 * 1024 * 32 * 128 * 2
    assert attention_bytes(gqa, "bfloat16", 512, 4, 1024) == gathered + repeated + query
    mha = replace(gqa, kv_heads=32)  # GPT-2: every head has its own K/V, nothing to repeat
    assert attention_bytes(mha, "bfloat16", 512, 4, 1024) == 2 * 4 * 1024 * 32 * 128 * 2 + query


def test_eager_attention_adds_its_scores_in_the_model_dtype_and_fp32() -> None:
    sdpa = facts(LLAMA3_8B)
    eager = replace(sdpa, eager_attention=True)
    scores = 2048 * (4 * 2048) * 32 * (2 + 4)
    assert (
        attention_bytes(eager, "bfloat16", 2048, 4, 2048) - attention_bytes(sdpa, "bfloat16", 2048, 4, 2048) == scores
    )


def test_gemma2_soft_capping_means_eager_attention() -> None:
    assert facts(LLAMA3_8B, attn_logit_softcapping=50.0).eager_attention
    assert not facts(LLAMA3_8B).eager_attention
    assert not facts(LLAMA3_8B, attn_logit_softcapping=None).eager_attention


def test_activations_take_the_larger_of_attention_and_mlp_over_the_residual_stream() -> None:
    f = facts(LLAMA3_8B)
    tokens, concurrency, context = 2048, 1, 2048
    mlp = tokens * 3 * 14336 * 2
    attention = attention_bytes(f, "bfloat16", tokens, concurrency, context)
    assert mlp > attention
    hidden = tokens * HIDDEN_TENSORS * 4096 * 2
    expected = (
        mask_bytes(f, "bfloat16", tokens, concurrency, context)
        + hidden
        + mlp
        + concurrency * (128256 * (4 + 2) + SERVING_BYTES_PER_SEQUENCE)
    )
    assert activation_bytes(f, "bfloat16", tokens, concurrency, context) == expected
    # many long sequences read more K/V than a chunk's MLP holds: attention decides
    many = activation_bytes(f, "bfloat16", tokens, 64, 8192) - mask_bytes(f, "bfloat16", tokens, 64, 8192)
    assert many == hidden + attention_bytes(f, "bfloat16", tokens, 64, 8192) + 64 * (
        128256 * 6 + SERVING_BYTES_PER_SEQUENCE
    )


def test_a_forward_costs_at_least_the_measured_floor_per_token() -> None:
    narrow = facts(
        LLAMA3_8B, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024
    )
    floor = 2048 * FORWARD_BYTES_PER_TOKEN
    assert activation_bytes(narrow, "float32", 2048, 1, 2048) == (
        mask_bytes(narrow, "float32", 2048, 1, 2048) + floor + 1024 * (4 + 4) + SERVING_BYTES_PER_SEQUENCE
    )


def test_the_generate_engine_caches_exactly_what_its_rows_hold() -> None:
    f = facts(LLAMA3_8B)
    per_token = 2 * 32 * 8 * 128 * 2
    assert kv_cache_bytes(f, "bfloat16", 1000, 3, engine=GENERATE) == per_token * 1000 * 3  # no pages, no slack
    assert kv_cache_bytes(f, "bfloat16", 1000, 3) > kv_cache_bytes(f, "bfloat16", 1000, 3, engine=GENERATE)


def test_the_generate_engine_reads_only_its_own_rows_keys_and_preallocates_nothing() -> None:
    gqa = facts(LLAMA3_8B)
    tokens, rows, context = 2048, 4, 2048
    repeated = 2 * rows * context * 32 * 128 * 2  # the padding mask makes sdpa repeat K/V to every head
    query = tokens * 32 * 128 * 2 * 2
    mask = tokens * context  # one bool per query row's chunk token and key
    assert generate_attention_bytes(gqa, "bfloat16", tokens, rows, context) == repeated + mask + query
    eager = replace(gqa, eager_attention=True)  # each chunk token scores its own row's keys only
    assert generate_attention_bytes(eager, "bfloat16", tokens, rows, context) - generate_attention_bytes(
        gqa, "bfloat16", tokens, rows, context
    ) == tokens * context * 32 * (2 + 4)
    # no masks kept, no per-token floor: the narrow model's forward is its tensors
    narrow = facts(
        LLAMA3_8B, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024
    )
    hidden = tokens * HIDDEN_TENSORS * 64 * 4
    attention = generate_attention_bytes(narrow, "float32", tokens, rows, context)
    assert attention > tokens * 3 * 160 * 4
    assert activation_bytes(narrow, "float32", tokens, rows, context, engine=GENERATE) == (
        hidden + attention + rows * (1024 * (4 + 4) + SERVING_BYTES_PER_SEQUENCE)
    )
    assert activation_bytes(narrow, "float32", tokens, rows, context, engine=GENERATE) < activation_bytes(
        narrow, "float32", tokens, rows, context
    )


def test_experts_stored_one_tensor_each_count_twice_where_weights_stay_mapped() -> None:
    moe = facts(MIXTRAL_8X7B)
    experts = 32 * 8 * 3 * 14336 * 4096 * 2
    assert moe.split_expert_bytes == experts
    layer = next(b for b in moe.blocks if b.name == "layer.0")
    assert layer.split_expert_bytes == experts // 32
    assert block_weight_bytes(layer, moe, "bfloat16", "none") == layer.bytes + layer.split_expert_bytes
    assert block_weight_bytes(layer, moe, "bfloat16", "none", mapped=False) == layer.bytes  # loaded onto a GPU
    assert sum(block_weight_bytes(b, moe, "bfloat16", "none") for b in moe.blocks) == moe.weights_bytes + experts
    dense = facts(LLAMA3_8B)
    assert dense.split_expert_bytes == 0
    assert sum(block_weight_bytes(b, dense, "bfloat16", "none") for b in dense.blocks) == dense.weights_bytes
