"""Facts from headers: real shapes, every bad input, local folders, the HF cache and a faked hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memserve.checkpoint import locate as locate_mod
from memserve.checkpoint.facts import mlp_tensors, read_adapter_facts, read_local_facts, with_adapters
from memserve.checkpoint.locate import locate, read_facts
from memserve.errors import CheckpointError, HubUnavailable, MemserveError, ModelNotFound
from tests.fakes import (
    LLAMA3_8B,
    MIXTRAL_8X7B,
    QWEN2_05B,
    QWEN25_14B,
    tensors_for,
    write_header_only,
    write_sparse_checkpoint,
)


@pytest.mark.parametrize(
    ("config", "shards", "params", "kv_per_token"),
    [
        (LLAMA3_8B, 4, 8_030_261_248, 131_072),
        (QWEN25_14B, 8, 14_770_033_664, 196_608),
        (QWEN2_05B, 1, 494_032_768, 12_288),  # tied: the embedding counted once
        (MIXTRAL_8X7B, 19, 46_702_792_704, 131_072),  # every expert counts
    ],
    ids=["llama-3-8b", "qwen2.5-14b", "qwen2-0.5b", "mixtral-8x7b"],
)
def test_facts_of_published_shapes(tmp_path: Path, config: dict, shards: int, params: int, kv_per_token: int) -> None:
    folder = write_sparse_checkpoint(tmp_path / "m", config, shards=shards)
    facts = read_local_facts(folder)
    assert facts.params == params
    assert facts.weights_bytes == 2 * params
    assert facts.bytes_by_dtype == {"BF16": 2 * params}
    assert facts.shards == shards
    assert facts.kv_bytes_per_token() == kv_per_token
    assert facts.layers == config["num_hidden_layers"]
    assert facts.dtype == "bfloat16"
    assert [b.name for b in facts.blocks] == ["embed", *(f"layer.{i}" for i in range(facts.layers)), "head"]
    assert sum(b.bytes for b in facts.blocks) == facts.weights_bytes
    assert facts.format == "safetensors" and not facts.warnings


def test_moe_and_sliding_window_fields(tmp_path: Path) -> None:
    facts = read_local_facts(write_sparse_checkpoint(tmp_path / "m", MIXTRAL_8X7B))
    assert (facts.experts, facts.experts_per_token) == (8, 2)
    gemma_like = {**QWEN2_05B, "sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"] * 12}
    f2 = read_local_facts(write_sparse_checkpoint(tmp_path / "g", gemma_like))
    assert (f2.sliding_window, f2.sliding_window_layers) == (512, 12)
    assert f2.kv_bytes(4096) == 12 * 2 * 2 * 64 * 2 * 4096 + 12 * 2 * 2 * 64 * 2 * 512


def test_tied_embeddings_stored_twice_are_counted_once(tmp_path: Path) -> None:
    tensors = tensors_for({**QWEN2_05B, "tie_word_embeddings": False})
    folder = write_sparse_checkpoint(tmp_path / "m", QWEN2_05B, tensors=tensors)
    assert read_local_facts(folder).params == 494_032_768


def test_prequantized_config_is_kept(tmp_path: Path) -> None:
    config = {**LLAMA3_8B, "quantization_config": {"quant_method": "awq", "bits": 4}}
    facts = read_local_facts(write_sparse_checkpoint(tmp_path / "m", config))
    assert facts.prequantized and facts.quantization == {"quant_method": "awq", "bits": 4}


def test_bin_only_checkpoint_is_estimated_and_flagged(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**QWEN2_05B, "dtype": "float16"}))
    with (folder / "pytorch_model.bin").open("wb") as f:
        f.truncate(988_065_536)
    facts = read_local_facts(folder)
    assert facts.format == "bin"
    assert facts.weights_bytes == pytest.approx(988_065_536, abs=64)
    assert any("unsafe" in w and "slower" in w for w in facts.warnings)


def test_lora_adapter_facts(tmp_path: Path) -> None:
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "Qwen/Qwen2-0.5B",
                "r": 8,
                "lora_alpha": 16,
                "target_modules": ["q_proj", "v_proj"],
                "peft_type": "LORA",
            }
        )
    )
    tensors = {}
    for i in range(24):
        for proj, out in (("q_proj", 896), ("v_proj", 128)):
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{p}.lora_A.weight"] = ("F32", [8, 896])
            tensors[f"{p}.lora_B.weight"] = ("F32", [out, 8])
    write_header_only(adapter / "adapter_model.safetensors", tensors)
    facts = read_adapter_facts(adapter)
    assert facts.rank == 8 and facts.base_model == "Qwen/Qwen2-0.5B"
    assert facts.params == 24 * (8 * 896 * 2 + 896 * 8 + 128 * 8)
    assert facts.weights_bytes == 4 * facts.params
    base = read_local_facts(write_sparse_checkpoint(tmp_path / "base", QWEN2_05B))
    both = with_adapters(base, (facts,))
    assert both.weights_bytes == base.weights_bytes + facts.weights_bytes
    with pytest.raises(CheckpointError, match=r"LoRA adapter for Qwen/Qwen2-0.5B.*--adapter"):
        read_local_facts(adapter)


# ----------------------------------------------------------------------------------- bad input


def _corrupt_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes((64).to_bytes(8, "little") + b"{not json" + b" " * 55)


def _short_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes((10_000).to_bytes(8, "little") + b'{"a":')


def _truncated_data(folder: Path) -> None:
    write_header_only(folder / "model.safetensors", tensors_for(QWEN2_05B), truncate_by=1000)


def _missing_field(folder: Path) -> None:
    config = dict(QWEN2_05B)
    del config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))


def _bad_json(folder: Path) -> None:
    (folder / "config.json").write_text("{'single': quotes}")


def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )


@pytest.mark.parametrize(
    ("breaks", "error", "fragment"),
    [
        (_corrupt_header, CheckpointError, "corrupt or truncated"),
        (_short_header, CheckpointError, "corrupt or truncated"),
        (_truncated_data, CheckpointError, "truncated: its header describes"),
        (_missing_field, CheckpointError, r"num_hidden_layers .* is missing"),
        (_bad_json, CheckpointError, "config.json is not valid JSON"),
        (_no_weights, CheckpointError, "no weights"),
        (_missing_shard, CheckpointError, "missing"),
    ],
)
def test_broken_checkpoints_give_one_line_errors(tmp_path: Path, breaks, error, fragment) -> None:  # type: ignore[no-untyped-def]
    folder = write_sparse_checkpoint(tmp_path / "m", QWEN2_05B)
    breaks(folder)
    with pytest.raises(error, match=fragment) as info:
        read_local_facts(folder)
    assert "\n" not in info.value.message
    assert str(folder) in info.value.message


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        read_facts(str(tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="is a file"):
        read_facts(str(tmp_path / "file.txt"))
    with pytest.raises(ModelNotFound, match="no such file"):
        read_facts(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFound, match="not a hub id"):
        read_facts("not a//model")


# ----------------------------------------------------------------------------- HF cache and hub


def _cache_repo(cache: Path, repo_id: str, config: dict) -> Path:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return write_sparse_checkpoint(repo / "snapshots" / commit, config)


def test_cached_hub_id_is_found_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _cache_repo(tmp_path / "hub", "Qwen/Qwen2-0.5B", QWEN2_05B)
    source = locate("Qwen/Qwen2-0.5B")
    assert source.kind == "hf-cache" and source.path == snapshot
    assert read_facts("Qwen/Qwen2-0.5B").params == 494_032_768


def test_hf_home_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache_repo(tmp_path / "hf" / "hub", "Qwen/Qwen2-0.5B", QWEN2_05B)
    assert locate("Qwen/Qwen2-0.5B").kind == "hf-cache"


def test_uncached_id_offline_names_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable) as info:
        read_facts("meta-llama/Llama-3.1-8B")
    assert str(tmp_path / "hub") in info.value.message and "HF_HUB_OFFLINE" in info.value.message


def test_hub_id_online_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is faked: config.json comes from a 'download', headers from get_safetensors_metadata."""
    import huggingface_hub
    from huggingface_hub import get_local_safetensors_metadata

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    remote = write_sparse_checkpoint(tmp_path / "remote", LLAMA3_8B, shards=4)
    calls: list[str] = []

    def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append(filename)
        return str(remote / filename)

    def fake_metadata(repo_id: str, **kwargs: object) -> object:
        calls.append("headers")
        return get_local_safetensors_metadata(remote)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake_metadata)
    monkeypatch.setattr("memserve.checkpoint.locate.hub_unreachable_reason", lambda: None)  # the probe: "up"
    facts = read_facts("meta-llama/Llama-3.1-8B")
    assert facts.params == 8_030_261_248 and facts.shards == 4
    assert calls == ["config.json", "headers"]  # nothing else fetched


def test_hub_unreachable_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args: object, **kwargs: object) -> str:
        raise ConnectionError("Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(HubUnavailable, match="could not be reached"):
        read_facts("org/model")
    assert issubclass(HubUnavailable, MemserveError) and locate_mod.hub_offline() is False


@pytest.mark.parametrize(
    ("config", "names", "tensors"),
    [
        ({"hidden_act": "silu"}, ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"], 3),
        ({"hidden_act": "silu"}, ["model.layers.0.block_sparse_moe.experts.0.w1.weight"], 3),  # Mixtral's experts
        ({"hidden_activation": "gelu_pytorch_tanh"}, ["model.layers.0.mlp.gate_proj.weight"], 3),  # Gemma2: gated
        ({"activation_function": "gelu_new"}, ["h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"], 4),  # GPT-2
        ({"activation_function": "relu"}, ["model.decoder.layers.0.fc1.weight"], 2),  # OPT: one fused op
    ],
)
def test_mlp_tensors_alive_at_once_follow_gating_and_the_activation(
    config: dict, names: list[str], tensors: int
) -> None:
    assert mlp_tensors(config, names) == tensors
