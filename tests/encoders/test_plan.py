"""The encoder plan as a table: no KV cache, activations by the heaviest batch the token budget admits."""

from __future__ import annotations

from pathlib import Path

import pytest

from memserve.checkpoint.encoders import read_folder_encoder_facts
from memserve.checkpoint.facts import read_local_facts
from memserve.memory.encoders import RESULT_BYTES_PER_VALUE, encoder_batch_shape, encoder_need, encoder_plan
from memserve.memory.estimate import CPU_GENERATE_RUNTIME_BYTES, FORWARD_BYTES_PER_TOKEN, SERVING_BYTES_PER_SEQUENCE
from memserve.memory.fit import PlanFile
from memserve.memory.inventory import Device, Inventory
from memserve.memory.planner import Plan, Policy, Request
from memserve.wire.encoders import MAX_INPUTS

GiB, MiB = 1024**3, 1024**2
CPU = Device("cpu", "cpu", 16 * GiB, 15 * GiB, headroom_bytes=512 * MiB)
GPU = Device("cuda:0", "cuda", 24 * GiB, 23 * GiB, headroom_bytes=512 * MiB, compute_capability=(8, 9))


@pytest.mark.parametrize(
    ("max_tokens", "budget", "shape"),
    [(128, 2048, (16, 128)), (512, 2048, (4, 512)), (512, 512, (1, 512)), (512, 100, (1, 512)), (128, 200, (1, 128))],
)
def test_heaviest_batch_is_whole_inputs_of_the_limit(max_tokens: int, budget: int, shape: tuple[int, int]) -> None:
    assert encoder_batch_shape(max_tokens, budget) == shape


def test_need_of_the_tiny_bert(bert_embed_dir: Path) -> None:
    facts, encoder = read_local_facts(bert_embed_dir), read_folder_encoder_facts(bert_embed_dir)
    assert encoder is not None
    need = encoder_need(facts, encoder, dtype="float32", max_batch_tokens=2048, concurrency=4)
    assert need.weights_bytes == facts.weights_bytes
    assert need.runtime_bytes == CPU_GENERATE_RUNTIME_BYTES
    # hidden 64 × 2048 tokens is tiny beside the measured floor per forward token
    answers = MAX_INPUTS * 64 * RESULT_BYTES_PER_VALUE  # one request of the most inputs, 64 values each
    assert need.activation_bytes == 2048 * FORWARD_BYTES_PER_TOKEN + 4 * SERVING_BYTES_PER_SEQUENCE + answers
    bigger = encoder_need(facts, encoder, dtype="float32", max_batch_tokens=8192, concurrency=4)
    assert bigger.activation_bytes > need.activation_bytes and (bigger.rows, bigger.length) == (64, 128)


@pytest.mark.parametrize(
    ("inventory", "rung", "devices"),
    [(Inventory((CPU,)), "cpu", {"cpu"}), (Inventory((CPU, GPU)), "gpu", {"cpu", "cuda:0"})],
)
def test_plan_has_engine_encoder_and_no_kv_cache(
    electra_classify_dir: Path, inventory: Inventory, rung: str, devices: set[str]
) -> None:
    facts, encoder = read_local_facts(electra_classify_dir), read_folder_encoder_facts(electra_classify_dir)
    assert encoder is not None
    result = encoder_plan(facts, encoder, Request(context_tokens=4096, concurrency=2), inventory, Policy())
    plan = result.plan
    assert plan is not None and (plan.rung, plan.engine, set(plan.devices)) == (rung, "encoder", devices)
    assert plan.context_tokens == 128  # the model's input limit, whatever the request asked
    assert plan.max_batch_tokens == 2048
    assert all(need.kv_cache_bytes == 0 for need in plan.devices.values())
    assert Plan.from_json(plan.to_json()) == plan  # the plan file a runner is started with


def test_nothing_fits_says_what_is_needed(electra_classify_dir: Path) -> None:
    facts, encoder = read_local_facts(electra_classify_dir), read_folder_encoder_facts(electra_classify_dir)
    assert encoder is not None
    small = Inventory((Device("cpu", "cpu", GiB, 300 * MiB),))
    result = encoder_plan(facts, encoder, Request(context_tokens=128), small, Policy())
    assert result.plan is None and result.nofit is not None
    assert "does not fit" in result.nofit.message


def test_plan_file_round_trip(bert_embed_dir: Path) -> None:
    facts, encoder = read_local_facts(bert_embed_dir), read_folder_encoder_facts(bert_embed_dir)
    assert encoder is not None
    plan = encoder_plan(facts, encoder, Request(context_tokens=128), Inventory((CPU,)), Policy()).plan
    assert plan is not None
    launch = PlanFile(str(bert_embed_dir), plan)
    assert PlanFile.from_json(launch.to_json()).plan.engine == "encoder"


def test_scores_are_priced_only_where_attention_materialises_them(bert_embed_dir: Path) -> None:
    from dataclasses import replace

    facts, encoder = read_local_facts(bert_embed_dir), read_folder_encoder_facts(bert_embed_dir)
    assert encoder is not None
    facts = replace(facts, heads=64)  # enough heads for the scores to outweigh the per-token floor
    sdpa = encoder_need(facts, encoder, dtype="float32", max_batch_tokens=8192, concurrency=1)
    eager = encoder_need(
        replace(facts, eager_attention=True), encoder, dtype="float32", max_batch_tokens=8192, concurrency=1
    )
    rows, length = 64, 128
    hidden = rows * length * 6 * 64 * 4
    mask = rows * length * length * 4
    scores = 2 * rows * 64 * length * length * 4  # the scores and their softmax, per head
    floor = rows * length * 16 * 1024  # what sdpa is priced at here: the per-token floor
    assert eager.activation_bytes - sdpa.activation_bytes == hidden + mask + scores - floor
