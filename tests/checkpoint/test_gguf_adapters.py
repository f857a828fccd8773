"""GGUF LoRA adapters, from their headers: their facts, the checks llama.cpp makes when it loads one (made here
first, with a clear error naming both files), the wrong kind of adapter for a base, and what a plan adds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memserve.checkpoint.demo import write_demo_model
from memserve.checkpoint.demo_adapter import write_demo_adapter
from memserve.checkpoint.demo_gguf import convert_demo_checkpoint
from memserve.checkpoint.gguf import GgufFacts, read_gguf_adapter, read_gguf_facts
from memserve.checkpoint.locate import with_adapter_sources
from memserve.engines.fit import fit_result
from memserve.engines.llamacpp import LORA_EXTRA_FRACTION, LORA_FIXED_BYTES, arguments
from memserve.errors import CheckpointError
from memserve.memory.fit import PlanFile
from memserve.memory.probe import probe_inventory


@pytest.fixture(scope="module")
def gguf_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf-base") / "tiny.gguf"
    convert_demo_checkpoint(tiny_model_dir, path, gguf_type="f32")
    return path


@pytest.fixture(scope="module")
def gguf_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf-adapter") / "ad1.gguf"
    return write_demo_adapter(tiny_model_dir, out, seed=1, targets=("q_proj", "v_proj", "down_proj")).path


def handmade(path: Path, arch: str, tensors: dict[str, tuple[int, ...]], kind: str = "adapter") -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch)
    writer.add_type(kind)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_demo_gguf_adapter_is_read_and_checked_against_its_base(gguf_base: Path, gguf_adapter: Path) -> None:
    facts = read_gguf_adapter(gguf_adapter, read_gguf_facts(gguf_base))
    # tiny: 2 layers, hidden 64, kv 2 × 16, ffn 160; A [8, in] and B [out, 8] for q (64→64), v (64→32), down (160→64)
    per_layer = 8 * 64 + 64 * 8 + 8 * 64 + 32 * 8 + 8 * 160 + 64 * 8
    assert (facts.rank, facts.alpha, facts.params) == (8, 16.0, 2 * per_layer)
    assert facts.target_modules == ("attn_q", "attn_v", "ffn_down") and facts.weights_bytes == 4 * facts.params


def test_the_plan_adds_each_adapter_and_its_runner_loads_them_in_order(
    gguf_base: Path, gguf_adapter: Path, tmp_path: Path
) -> None:
    inventory = probe_inventory(memory="cpu=4GiB")
    _, _, alone = fit_result(str(gguf_base), context=256, inventory=inventory)
    facts, _, both = fit_result(str(gguf_base), context=256, adapters=(str(gguf_adapter),) * 2, inventory=inventory)
    assert isinstance(facts, GgufFacts) and len(facts.adapters) == 2
    assert alone.plan is not None and both.plan is not None
    size = facts.adapters[0].weights_bytes
    added = 2 * (size + int(size * LORA_EXTRA_FRACTION) + LORA_FIXED_BYTES)
    assert both.plan.reserved_bytes["cpu"] - alone.plan.reserved_bytes["cpu"] == added
    launch = PlanFile(str(gguf_base), both.plan, adapters=(("a", str(gguf_adapter)), ("b", "x.gguf")))
    argv = arguments("tiny", launch, host="127.0.0.1", port=1, environ={"MEMSERVE_LLAMA_SERVER_COMMAND": "true"})
    assert argv[argv.index("--lora") + 1] == f"{gguf_adapter.resolve()},{Path('x.gguf').resolve()}"


@pytest.mark.parametrize(
    ("arch", "tensors", "kind", "words"),
    [
        ("llama", {"blk.0.attn_q.weight.lora_a": (8, 64), "blk.0.attn_q.weight.lora_b": (32, 8)}, "adapter",
         "takes 64 inputs and gives 32 outputs in the adapter, but 64 and 64 in"),
        ("qwen2", {"blk.0.attn_q.weight.lora_a": (8, 64), "blk.0.attn_q.weight.lora_b": (64, 8)}, "adapter",
         "is for a qwen2 model"),
        ("llama", {"blk.9.attn_q.weight.lora_a": (8, 64), "blk.9.attn_q.weight.lora_b": (64, 8)}, "adapter",
         "adapts blk.9.attn_q.weight, which"),
        ("llama", {"blk.0.attn_q.weight.lora_a": (8, 64), "blk.0.attn_q.weight.lora_b": (64, 4)}, "adapter",
         "A and B of different ranks"),
        ("llama", {"blk.0.attn_q.weight.lora_a": (8, 64)}, "adapter", "lacks its A/B pair"),
        ("llama", {"blk.0.attn_q.weight.lora_a": (8, 64)}, "model", "is not a GGUF LoRA adapter"),
    ],
)  # fmt: skip
def test_a_bad_gguf_adapter_is_refused_naming_it_and_the_base(
    gguf_base: Path, tmp_path: Path, arch: str, tensors: dict[str, tuple[int, ...]], kind: str, words: str
) -> None:
    bad = handmade(tmp_path / "bad.gguf", arch, tensors, kind)
    with pytest.raises(CheckpointError) as caught:
        with_adapter_sources(read_gguf_facts(gguf_base), (str(bad),))
    assert words in caught.value.message and str(bad) in caught.value.message


def test_the_wrong_kind_of_adapter_for_a_base_says_what_to_pass(
    tiny_model_dir: Path, gguf_base: Path, gguf_adapter: Path, tmp_path: Path
) -> None:
    peft = write_demo_adapter(tiny_model_dir, tmp_path / "peft", seed=1).path
    with pytest.raises(CheckpointError, match=r"llama\.cpp serves with GGUF LoRA adapters only: convert"):
        with_adapter_sources(read_gguf_facts(gguf_base), (str(peft),))
    with pytest.raises(CheckpointError, match="takes PEFT adapter folders"):
        fit_result(str(tiny_model_dir), adapters=(str(gguf_adapter),), inventory=probe_inventory(memory="cpu=4GiB"))
    comma = tmp_path / "a,b.gguf"
    comma.write_bytes(gguf_adapter.read_bytes())
    with pytest.raises(CheckpointError, match="path has a comma"):
        with_adapter_sources(read_gguf_facts(gguf_base), (str(comma),))


def test_demo_adapter_to_gguf_needs_a_demo_checkpoint(tmp_path: Path) -> None:
    qwen = write_demo_model(tmp_path / "qwen", size="tiny", arch="qwen2").path
    made = write_demo_adapter(qwen, tmp_path / "q.gguf", seed=1)
    assert made.path.stat().st_size == made.weights_bytes and not (tmp_path / "peft").exists()
