"""Demo checkpoints: loadable offline, exactly shaped, sharded, deterministic, and useful to generate from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from memserve.checkpoint import demo, demo_tokenizer
from memserve.checkpoint.demo import SIZES, write_demo_model
from memserve.cli.demo_model import demo_model
from memserve.errors import InvalidArgument


def _load(path: Path) -> tuple[Any, Any]:
    """Model and tokenizer, as Any: transformers' annotations are looser than what it returns."""
    loaded: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, output_loading_info=True)
    model, info = loaded
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _stored_tensors(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor in every safetensors file of ``path``: name -> (file name, tensor)."""
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                assert name not in found, f"{name} stored twice"
                found[name] = (file.name, f.get_tensor(name))
    return found


def _safetensors_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.safetensors"))}


def _greedy_new_tokens(path: Path, prompt: str, max_new_tokens: int = 32) -> list[int]:
    model, tok = _load(path)
    enc: Any = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new: list[int] = out[0, enc["input_ids"].shape[1] :].tolist()
    return new


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_tiny_loads_offline_with_matching_vocab_and_special_ids(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    model, tok = _load(path)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) == SIZES["tiny"]["vocab_size"]
    assert model.config.max_position_embeddings == 2048
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.do_sample is False
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"], "no BOS added"
    assert all(t is not None for t in tok.convert_ids_to_tokens(list(range(len(tok))))), "every id decodes"


def test_stored_tensors_are_exactly_what_transformers_builds(tiny_model_dir: Path, tiny_qwen_dir: Path) -> None:
    for path, tied in ((tiny_model_dir, False), (tiny_qwen_dir, True)):
        model, _ = _load(path)
        stored = _stored_tensors(path)
        expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
        assert {n: tuple(t.shape) for n, (_, t) in stored.items()} == expected
        assert model.config.tie_word_embeddings is tied
        assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied


def test_qwen2_is_tied_with_qkv_biases_and_llama_is_not(tiny_model_dir: Path, tiny_qwen_dir: Path) -> None:
    qwen = _stored_tensors(tiny_qwen_dir)
    assert "lm_head.weight" not in qwen
    biases = {n for n in qwen if n.endswith(".bias")}
    assert {n.rsplit(".", 2)[-2] for n in biases} == {"q_proj", "k_proj", "v_proj"}
    assert len(biases) == 3 * SIZES["tiny"]["num_hidden_layers"]
    llama = _stored_tensors(tiny_model_dir)
    assert "lm_head.weight" in llama and not any(n.endswith(".bias") for n in llama)


def test_init_norms_ones_biases_zero_weights_random(tiny_qwen_dir: Path) -> None:
    for name, (_, t) in _stored_tensors(tiny_qwen_dir).items():
        if name.endswith(".bias"):
            assert torch.count_nonzero(t) == 0, name
        elif name.endswith("norm.weight"):
            assert torch.all(t == 1), name
        else:
            assert 0.2 < t.std().item() < 0.4, name  # tiny uses a wide init on purpose (varied greedy output)


def test_tiny_is_sharded_with_a_valid_index(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    assert all((tiny_model_dir / f).is_file() for f in set(weight_map.values()))
    stored = _stored_tensors(tiny_model_dir)
    assert {n: f for n, (f, _) in stored.items()} == weight_map
    files = sorted(tiny_model_dir.glob("*.safetensors"))
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    total = sum(t.numel() * t.element_size() for _, t in stored.values())
    assert index["metadata"]["total_size"] == total
    assert index["metadata"]["total_parameters"] == sum(t.numel() for _, t in stored.values())


def test_files_and_metadata(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") for n in names)
    assert not any(p.name.startswith(".tiny-llama.partial") for p in tiny_model_dir.parent.iterdir())
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["dtype"] == "float32" and config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]  # peers (transformers serve, vLLM) resolve by it
    with safe_open(str(tiny_model_dir / "model-00001-of-00002.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


# --- determinism -----------------------------------------------------------------------------------


def test_same_arguments_give_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    a = write_demo_model(tmp_path / "a", arch="qwen2", seed=7)
    b = write_demo_model(tmp_path / "b", arch="qwen2", seed=7)
    c = write_demo_model(tmp_path / "c", arch="qwen2", seed=8)
    assert (a.params, a.weights_bytes, a.shards) == (b.params, b.weights_bytes, b.shards)
    assert _safetensors_bytes(a.path) == _safetensors_bytes(b.path)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes() == (c.path / name).read_bytes()
    differing = [n for n, data in _safetensors_bytes(c.path).items() if data != _safetensors_bytes(a.path)[n]]
    assert differing, "a different seed must give different weights"


def test_tokenizer_training_is_deterministic() -> None:
    train = demo_tokenizer._trained_json.__wrapped__  # bypass the per-process cache
    assert train(1024) == train(1024)


def test_bfloat16_build_is_the_fp32_build_rounded(tmp_path: Path, tiny_model_dir: Path) -> None:
    info = write_demo_model(tmp_path / "bf16", dtype="bfloat16")
    assert info.dtype == "bfloat16" and info.weights_bytes == info.params * 2
    assert json.loads((info.path / "config.json").read_text())["dtype"] == "bfloat16"
    fp32, bf16 = _stored_tensors(tiny_model_dir), _stored_tensors(info.path)
    for name, (_, t) in bf16.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, fp32[name][1].to(torch.bfloat16)), name


# --- generation and chat ---------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_greedy_output_is_varied(fixture: str, request: pytest.FixtureRequest) -> None:
    """A random model that repeats one token would make every engine test pass trivially."""
    new = _greedy_new_tokens(request.getfixturevalue(fixture), "hi")
    assert len(new) == 32
    assert len(set(new)) >= 8, new


def test_chat_template_is_chatml(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(messages, tokenize=False)
    assert isinstance(no_prompt, str) and not no_prompt.endswith("assistant\n")
    encoded: Any = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids: list[int] = encoded["input_ids"]
    assert ids.count(tok.get_vocab()["<|im_start|>"]) == 3
    assert tok.decode(ids) == text


def test_text_round_trips_through_the_tokenizer(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    text = "The lighthouse keeper counted 112 steps — ünïcödé, emoji 🙂, tabs\tand\nnewlines."
    assert tok.decode(tok(text)["input_ids"]) == text


# --- sizes, without building them ------------------------------------------------------------------


@pytest.mark.parametrize(("size", "params_range", "shards"), [("small", (95e6, 110e6), 2), ("1b", (1.4e9, 1.5e9), 3)])
def test_larger_sizes_plan_the_expected_params_and_shards(
    size: str, params_range: tuple[float, float], shards: int
) -> None:
    dims = SIZES[size]
    config = demo._make_config(size, "llama", "bfloat16", vocab_size=dims["vocab_size"], pad_id=0, eos_id=2)
    specs = demo._tensor_specs(config)
    assert params_range[0] < sum(s.numel for s in specs) < params_range[1]
    assert len(demo._plan_shards(specs, 2, demo._SHARD_LIMIT_BYTES[size])) == shards
    assert config.max_position_embeddings == 4096


def test_sizes_table_has_the_documented_keys() -> None:
    assert list(SIZES) == ["tiny", "small", "1b"]
    for dims in SIZES.values():
        assert dims["hidden_size"] % dims["num_attention_heads"] == 0
        assert dims["num_attention_heads"] % dims["num_key_value_heads"] == 0


# --- arguments and the target directory ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        ({"size": "huge"}, "tiny, small, 1b"),
        ({"arch": "gpt2"}, "llama, qwen2"),
        ({"dtype": "int8"}, "float32, bfloat16, float16"),
        ({"seed": -1}, "between 0 and"),
    ],
)
def test_bad_arguments_say_what_is_accepted(tmp_path: Path, kwargs: dict[str, Any], accepted: str) -> None:
    with pytest.raises(InvalidArgument, match=accepted):
        write_demo_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


def test_force_replaces_checkpoint_files_only(tmp_path: Path) -> None:
    target = tmp_path / "m"
    write_demo_model(target)  # two shards and an index
    (target / "README.md").write_text("mine")
    with pytest.raises(InvalidArgument, match="not empty"):
        write_demo_model(target, dtype="bfloat16")
    info = write_demo_model(target, dtype="bfloat16", force=True)  # fits one shard
    assert info.shards == 1
    names = sorted(p.name for p in target.iterdir())
    assert "model.safetensors.index.json" not in names and "model-00001-of-00002.safetensors" not in names
    assert "model.safetensors" in names and (target / "README.md").read_text() == "mine"
    _load(target)


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_writes_and_reports(tmp_path: Path) -> None:
    result = CliRunner().invoke(demo_model, [str(tmp_path / "m"), "--arch", "qwen2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert "\n" not in line and str(tmp_path / "m") in line
    assert "qwen2 tiny float32" in line and "params" in line and "KiB" in line and "shard" in line
    assert (tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "huge"], "unknown size 'huge': expected one of tiny, small, 1b"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--seed", "-5"], "seed must be between"),
    ],
)
def test_cli_bad_value_is_one_line_error(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(demo_model, [str(tmp_path / "m"), *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), "no traceback"
    assert result.output.startswith(f"Error: {message}")
    assert result.output.count("\n") == 1


def test_cli_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(demo_model, [str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: ") and "not empty" in result.output and "--force" in result.output
    assert result.output.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
