"""LoRA adapters in-process: the per-token wrapper against PEFT's model, the bank's checks and lifecycle,
and the demo adapter itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from memserve.checkpoint.demo_adapter import write_demo_adapter
from memserve.checkpoint.facts import read_adapter_facts
from memserve.cli.demo_adapter import demo_adapter
from memserve.errors import CheckpointError, InvalidArgument, ModelNotFound
from memserve.runner.lora import NO_ADAPTER, LoraBank, LoraLinear, token_slots
from tests.adapters.conftest import peft_greedy

PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42], [100, 200, 300, 400, 500, 600, 700, 800, 900]]


def _base(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _copy(adapter: Path, to: Path) -> Path:
    shutil.copytree(adapter, to)
    return to


def test_token_slots_packs_each_request_then_pads_with_the_base() -> None:
    assert token_slots([2, 1, 3], [NO_ADAPTER, NO_ADAPTER, NO_ADAPTER], 8) is None
    slots = token_slots([2, 1, 3], [0, NO_ADAPTER, 5], 8)
    assert slots is not None and slots.tolist() == [[0, 0, -1, 5, 5, 5, -1, -1]]


def test_rows_of_different_adapters_in_one_forward_equal_each_merged_model(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """One batched ``generate`` with a row per adapter and one for the base: every row's greedy tokens are what
    PEFT's model gives that adapter alone, and the base row is the base's."""
    model = _base(tiny_model_dir)
    bank = LoraBank(model)
    names = ["ad1", "ad2", "ad3"]
    slots = [bank.add(name, adapter_dirs[name]) and bank.acquire(name) for name in names]
    prompt = PROMPTS[0]
    expected = [peft_greedy(tiny_model_dir, adapter_dirs[n], [prompt], 12, merge=True)[0] for n in names]
    base_expected = peft_greedy(tiny_model_dir, None, [prompt], 12)[0]
    assert len({tuple(e) for e in [*expected, base_expected]}) == 4  # every adapter changes the answer

    rows = torch.tensor([prompt] * 4)
    bank.routing.set(torch.tensor([[slots[0]], [NO_ADAPTER], [slots[1]], [slots[2]]]))
    with torch.inference_mode():
        out = model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), max_new_tokens=12, do_sample=False)
    got = [row[len(prompt) :].tolist() for row in out]
    assert got == [expected[0], base_expected, expected[1], expected[2]]


def test_packed_tokens_of_different_adapters_equal_each_alone(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """The wrapper's per-token path (continuous batching's packed row) gives each token what its adapter alone
    gives it: the layer outputs of a packed row equal those of each request's row run on its own."""
    model = _base(tiny_model_dir)
    bank = LoraBank(model)
    a, b = (bank.add(n, adapter_dirs[n]) and bank.acquire(n) for n in ("ad1", "ad2"))
    wrapper = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(wrapper, LoraLinear)
    x = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(0))
    bank.routing.set(token_slots([3, 2, 2], [a, NO_ADAPTER, b], 7))
    packed = wrapper(x)
    for start, end, slot in ((0, 3, a), (3, 5, NO_ADAPTER), (5, 7, b)):
        bank.routing.set(torch.full((1, end - start), slot))
        torch.testing.assert_close(packed[:, start:end], wrapper(x[:, start:end]))  # fp32 rounding only
    bank.routing.set(None)
    torch.testing.assert_close(wrapper(x), wrapper.base(x), rtol=0, atol=0)


def test_removed_adapter_serves_its_requests_in_flight_then_goes(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    bank = LoraBank(_base(tiny_model_dir))
    bank.add("ad1", adapter_dirs["ad1"])
    slot = bank.acquire("ad1")
    bank.remove("ad1")
    assert bank.names() == []
    with pytest.raises(ModelNotFound, match="no adapter named ad1"):
        bank.acquire("ad1")
    with pytest.raises(InvalidArgument, match="is being removed"):
        bank.add("ad1", adapter_dirs["ad1"])
    wrapper = bank.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert slot in wrapper.pairs and bank.weights_bytes > 0  # still served
    bank.release(slot)
    assert wrapper.pairs == {} and bank.weights_bytes == 0
    bank.add("ad1", adapter_dirs["ad1"])  # the name is free again
    assert bank.names() == ["ad1"]


def test_bank_refuses_a_second_adapter_of_the_same_name_and_bad_names(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    bank = LoraBank(_base(tiny_model_dir))
    bank.add("ad1", adapter_dirs["ad1"])
    with pytest.raises(InvalidArgument, match="ad1 is already loaded"):
        bank.add("ad1", adapter_dirs["ad2"])
    with pytest.raises(InvalidArgument, match="without ':' or '/'"):
        bank.add("tiny:ad1", adapter_dirs["ad1"])
    with pytest.raises(ModelNotFound, match="no adapter named ad9 is loaded on this base; loaded: ad1"):
        bank.remove("ad9")


def _other_base(root: Path) -> Path:
    """A Llama of other sizes (hidden 32), with an adapter written on it by PEFT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=1024,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "other-base")
    return write_demo_adapter(root / "other-base", root / "other-adapter").path


def test_bad_adapters_are_refused_with_what_is_wrong(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    bank = LoraBank(_base(tiny_model_dir))

    other = _other_base(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        bank.add("other", other)
    message = caught.value.message
    assert "trained for another base" in message and str(tmp_path / "other-base") in message
    assert str(tiny_model_dir) in message and "takes 32 inputs" in message and "64 and 64 in this base" in message
    assert caught.value.code == "adapter_base_mismatch"

    no_weights = _copy(adapter_dirs["ad1"], tmp_path / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no adapter_model.safetensors \(found: README.md, adapter_config"):
        bank.add("no-weights", no_weights)

    bad_target = _copy(adapter_dirs["ad1"], tmp_path / "bad-target")
    config = json.loads((bad_target / "adapter_config.json").read_text())
    (bad_target / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "qkv_proj"]}))
    with pytest.raises(CheckpointError, match="targets qkv_proj, which no module of the base model has"):
        bank.add("bad-target", bad_target)

    bad_layer = _copy(adapter_dirs["ad1"], tmp_path / "bad-layer")
    tensors = load_file(bad_layer / "adapter_model.safetensors")
    save_file(
        {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}, bad_layer / "adapter_model.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"targets model.layers.7.self_attn.(q|v)_proj, which does not exist"):
        bank.add("bad-layer", bad_layer)

    bad_rank = _copy(adapter_dirs["ad1"], tmp_path / "bad-rank")
    (bad_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(CheckpointError, match=r"has rank 8 in its weights but rank 4 in adapter_config\.json"):
        bank.add("bad-rank", bad_rank)

    dora = _copy(adapter_dirs["ad1"], tmp_path / "dora")
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"uses DoRA \(use_dora\)"):
        bank.add("dora", dora)

    with pytest.raises(ModelNotFound, match="is not a folder"):
        bank.add("missing", tmp_path / "missing")

    assert bank.names() == [] and bank.weights_bytes == 0  # nothing half-installed
    bank.add("ad1", adapter_dirs["ad1"])  # and the bank still works
    assert bank.names() == ["ad1"]


def test_demo_adapter_is_deterministic_changes_answers_and_is_priced_from_its_header(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = write_demo_adapter(tiny_model_dir, tmp_path / "a", rank=4, targets=("q_proj", "o_proj"), seed=7)
    again = write_demo_adapter(tiny_model_dir, tmp_path / "b", rank=4, targets=("q_proj", "o_proj"), seed=7)
    other = write_demo_adapter(tiny_model_dir, tmp_path / "c", rank=4, targets=("q_proj", "o_proj"), seed=8)
    weights = [(p.path / "adapter_model.safetensors").read_bytes() for p in (first, again, other)]
    assert weights[0] == weights[1] != weights[2]
    tensors = load_file(first.path / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    assert first.modules == 4 and first.rank == 4
    facts = read_adapter_facts(first.path)
    assert facts.rank == 4 and facts.weights_bytes == sum(t.nbytes for t in tensors.values())
    bank = LoraBank(_base(tiny_model_dir))
    assert bank.add("a", first.path).weights_bytes == facts.weights_bytes  # fp32 base: held as stored


def test_demo_adapter_command(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(demo_adapter, [str(tiny_model_dir), str(tmp_path / "out"), "--rank", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "LoRA r=2 on q_proj,v_proj (4 modules)" in result.output
    again = runner.invoke(demo_adapter, [str(tiny_model_dir), str(tmp_path / "out")])
    assert again.exit_code != 0 and "exists and is not an empty folder" in again.output
    bad = runner.invoke(demo_adapter, [str(tiny_model_dir), str(tmp_path / "bad"), "--targets", "nothing_here"])
    assert bad.exit_code != 0 and "cannot put LoRA on" in bad.output and "nothing_here" in bad.output


def test_an_adapter_is_checked_on_its_base_from_the_headers_before_any_runner(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """What the runner finds once loaded (the test above), found from the two safetensors headers, so that an
    adapter added to a stopped model is refused then, not at every later load of its base."""
    from memserve.checkpoint.demo_encoder import write_demo_encoder, write_demo_encoder_adapter
    from memserve.checkpoint.demo_vision import write_demo_vision_model
    from memserve.checkpoint.facts import check_adapters_on_base
    from memserve.checkpoint.locate import read_facts, with_adapter_sources

    check_adapters_on_base(adapter_dirs.values(), tiny_model_dir)  # its own base: passes, the base read once
    with pytest.raises(CheckpointError, match="takes 32 inputs and gives") as caught:
        check_adapters_on_base([_other_base(tmp_path)], tiny_model_dir)  # same names, other widths
    assert caught.value.code == "adapter_base_mismatch" and caught.value.status_code == 400
    classifier = write_demo_encoder(tmp_path / "electra", arch="electra", task="classify", labels=("a", "b")).path
    check_adapters_on_base([write_demo_encoder_adapter(classifier, tmp_path / "spam")], classifier)  # its own
    with pytest.raises(CheckpointError, match=r"which the base .* does not have") as caught:
        with_adapter_sources(read_facts(str(classifier)), (str(adapter_dirs["ad1"]),))  # a decoder's, on it
    assert caught.value.code == "adapter_base_mismatch"
    vision = write_demo_vision_model(tmp_path / "llava").path  # a vision base's own (language-model) adapter
    check_adapters_on_base([write_demo_adapter(vision, tmp_path / "vision-adapter").path], vision)
