"""GGUF facts from the header, GGUF sources in locate, and the demo GGUF: no llama.cpp, no network."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from memserve.checkpoint.demo_gguf import convert_demo_checkpoint, write_demo_gguf
from memserve.checkpoint.gguf import GgufFacts, read_gguf_facts
from memserve.checkpoint.locate import check_source, find_gguf
from memserve.cli import main
from memserve.errors import CheckpointError, InvalidArgument, ModelNotFound


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama demo model as an f32 GGUF. Read it; do not write into it."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    convert_demo_checkpoint(tiny_model_dir, path, gguf_type="f32")
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


# --------------------------------------------------------------------------------------------- facts


@pytest.mark.parametrize(
    ("gguf_type", "file_type", "weights_bytes", "matrix_type"),
    [
        # 217,408 params: 320 in the five 64-wide norms, stored f32 whatever the file type
        ("f32", "f32", 217_408 * 4, "F32"),
        ("f16", "f16", 217_088 * 2 + 320 * 4, "F16"),
        ("bf16", "bf16", 217_088 * 2 + 320 * 4, "BF16"),
        # q8_0: 32 weights in 34 bytes
        ("q8_0", "q8_0", 217_088 // 32 * 34 + 320 * 4, "Q8_0"),
    ],
)
def test_header_facts_of_the_tiny_demo(
    tiny_model_dir: Path, tmp_path: Path, gguf_type: str, file_type: str, weights_bytes: int, matrix_type: str
) -> None:
    path = tmp_path / f"tiny-{gguf_type}.gguf"
    assert convert_demo_checkpoint(tiny_model_dir, path, gguf_type=gguf_type) == 217_408
    facts = read_gguf_facts(path, source="models/tiny")
    assert (facts.source, facts.path, facts.architecture, facts.file_type) == (
        "models/tiny",
        str(path),
        "llama",
        file_type,
    )
    assert facts.params == 217_408 and facts.weights_bytes == weights_bytes
    assert set(facts.bytes_by_type) == {matrix_type} | ({"F32"} if matrix_type != "F32" else set())
    assert (facts.layers, facts.hidden_size, facts.intermediate_size, facts.heads, facts.kv_heads) == (2, 64, 160, 4, 2)
    assert (facts.key_length, facts.value_length, facts.vocab_size, facts.max_context_tokens) == (16, 16, 1024, 2048)
    assert [b.name for b in facts.blocks] == ["embed", "layer.0", "layer.1", "head"]
    assert sum(b.bytes for b in facts.blocks) == facts.weights_bytes
    # K and V: 2 layers × 2 KV heads × (16 + 16) × 2 bytes (f16 cache)
    assert facts.kv_bytes_per_token() == 2 * 2 * 32 * 2 == 256
    # token_embd, output_norm and output, then 9 per layer
    assert facts.tensors == 3 + 2 * 9 and facts.file_bytes == path.stat().st_size
    summary = facts.summary()
    assert summary["format"] == "gguf" and summary["dtype"] == file_type and summary["kv_bytes_per_token"] == 256


def test_the_mixture_of_experts_demo_is_read_with_its_experts(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Each MLP (3 × 64 × 160 = 30,720 params) as 4 stacked experts behind a 4 × 64 router, as llama.cpp's
    Mixtral: 3 more copies of it and a router per layer."""
    path = tmp_path / "tiny-moe.gguf"
    assert convert_demo_checkpoint(tiny_model_dir, path, gguf_type="f32", experts=4) == 217_408 + 2 * (3 * 30_720 + 256)
    facts = read_gguf_facts(path)
    assert (facts.architecture, facts.experts, facts.experts_per_token, facts.intermediate_size) == ("llama", 4, 2, 160)
    assert facts.tensors == 3 + 2 * 10 and facts.weights_bytes == facts.params * 4
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in GGUFReader(path).tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == (64, 160, 4)  # GGUF lists dimensions innermost first
    assert shapes["blk.1.ffn_down_exps.weight"] == (160, 64, 4) and shapes["blk.1.ffn_gate_inp.weight"] == (64, 4)
    with pytest.raises(InvalidArgument, match="llama model with 1 to 4 experts"):
        convert_demo_checkpoint(tiny_model_dir, tmp_path / "bad.gguf", gguf_type="f32", experts=4, experts_used=5)


def test_qwen2_ties_its_head_to_the_embeddings(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "qwen.gguf"
    convert_demo_checkpoint(tiny_qwen_dir, path, gguf_type="f32")
    facts = read_gguf_facts(path)
    names = {t.name for t in GGUFReader(path).tensors}
    assert facts.architecture == "qwen2" and "output.weight" not in names and "blk.0.attn_q.bias" in names
    assert facts.blocks[-1].name == "head" and facts.blocks[-1].params == 64  # only output_norm


def test_per_layer_kv_heads_are_summed_layer_by_layer() -> None:
    facts = GgufFacts(
        source="m", path="m.gguf", architecture="x", name=None, file_type="q4_k_m", params=1, weights_bytes=1,
        params_by_type={}, bytes_by_type={}, blocks=(), layers=3, hidden_size=64, intermediate_size=128, heads=4,
        kv_heads_by_layer=(2, 0, 4), key_length=16, value_length=8, vocab_size=10, max_context_tokens=None,
        sliding_window=None, experts=None, experts_per_token=None, tensors=1, file_bytes=1,
    )  # fmt: skip
    assert facts.kv_heads == 4 and facts.kv_bytes_per_token() == (2 + 0 + 4) * (16 + 8) * 2


# -------------------------------------------------------------------------------------------- faults


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match=r"is not a GGUF file .*pass a \.gguf model file"):
        read_gguf_facts(path)


@pytest.mark.parametrize("keep", [4, 30, 600, 2_000])
def test_a_truncated_header_is_one_line_naming_the_file(tiny_gguf: Path, tmp_path: Path, keep: int) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:keep])
    with pytest.raises(CheckpointError) as caught:
        read_gguf_facts(path)
    message = caught.value.message
    assert str(path) in message and re.search(r"(truncated|corrupt) GGUF header", message) and "re-download" in message
    assert "\n" not in message


def test_truncated_tensor_data_is_caught(tiny_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"(truncated: its header describes \d+ bytes|truncated or corrupt)"):
        read_gguf_facts(path)


def test_an_unknown_tensor_type_says_what_to_do(tiny_gguf: Path, tmp_path: Path) -> None:
    path = _copy(tiny_gguf, tmp_path / "odd.gguf")
    reader = GGUFReader(path, "r+")
    reader.tensors[3].field.parts[4][0] = 250  # the tensor's ggml type, in place
    reader.data.flush()
    del reader
    with pytest.raises(CheckpointError) as caught:
        read_gguf_facts(path)
    message = caught.value.message
    assert str(path) in message and "unknown ggml type" in message and "pip install -U gguf" in message
    assert "\n" not in message


# -------------------------------------------------------------------------------------------- locate


def test_find_gguf_in_a_file_a_folder_and_a_cached_snapshot(
    tiny_gguf: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert find_gguf(str(tiny_gguf)) == tiny_gguf
    folder = tmp_path / "one"
    folder.mkdir()
    _copy(tiny_gguf, folder / "m.gguf")
    assert find_gguf(str(folder)) == folder / "m.gguf"
    snapshot = tmp_path / "cache" / "models--org--tiny-gguf" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    _copy(tiny_gguf, snapshot / "tiny.Q8_0.gguf")
    assert find_gguf("org/tiny-gguf") == snapshot / "tiny.Q8_0.gguf"
    # not GGUF sources: a transformers folder (even with a .gguf beside it), an uncached hub id
    assert find_gguf(str(tiny_model_dir)) is None
    assert find_gguf("org/not-cached") is None


def test_a_folder_with_several_gguf_files_lists_them(tiny_gguf: Path, tmp_path: Path) -> None:
    for name in ("a-Q4_K_M.gguf", "a-Q8_0.gguf"):
        _copy(tiny_gguf, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"holds 2 GGUF files \(a-Q4_K_M\.gguf, a-Q8_0\.gguf\); pass the one"):
        find_gguf(str(tmp_path))


def test_a_split_model_is_read_whole_from_its_first_file(tiny_model_dir: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    folder = tmp_path / "split"
    folder.mkdir()
    convert_demo_checkpoint(tiny_model_dir, folder / "tiny.gguf", gguf_type="f32", split_tensors=8)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"tiny-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]  # 21 tensors, 8 a file
    first = folder / names[0]
    whole, split = read_gguf_facts(tiny_gguf), read_gguf_facts(first)
    assert split.shards == 3 and split.summary()["shards"] == 3 and whole.shards == 1
    assert split.splits == tuple(str(folder / n) for n in names)
    assert (split.params, split.weights_bytes, split.tensors, split.blocks, split.kv_bytes_per_token()) == (
        whole.params,
        whole.weights_bytes,
        whole.tensors,
        whole.blocks,
        whole.kv_bytes_per_token(),
    )
    assert split.file_bytes == sum((folder / n).stat().st_size for n in names)
    assert find_gguf(str(folder)) == first  # a folder of one model's splits: llama.cpp takes the first

    with pytest.raises(CheckpointError, match=r"is split 2 of 3 of a model; pass the first file, tiny-00001-of-00003"):
        read_gguf_facts(folder / names[1])
    (folder / names[2]).unlink()
    with pytest.raises(CheckpointError, match=r"split into 3 files and tiny-00003-of-00003\.gguf is missing beside"):
        read_gguf_facts(first)
    shutil.copyfile(folder / names[1], folder / names[2])  # a split in the wrong place
    with pytest.raises(CheckpointError, match=r"is not split 3 of 3 of tiny-00001-of-00003\.gguf"):
        read_gguf_facts(first)


def test_a_missing_gguf_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such folder"):
        find_gguf(str(tmp_path / "nope.gguf"))


# ---------------------------------------------------------------------------------------- demo GGUF


def test_demo_gguf_is_deterministic_and_its_weights_are_the_checkpoints(tiny_gguf: Path, tmp_path: Path) -> None:
    first = write_demo_gguf(tmp_path / "a.gguf")
    write_demo_gguf(tmp_path / "b.gguf")
    assert (first.gguf_type, first.params, first.file_bytes) == ("f32", 217_408, tiny_gguf.stat().st_size)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes() == tiny_gguf.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]  # no staging folder left


def test_demo_gguf_carries_the_tokenizer_llama_cpp_needs(tiny_gguf: Path) -> None:
    fields = GGUFReader(tiny_gguf).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 1024 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"].contents()[:4] == [3, 3, 3, 1]  # control, then normal
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()


def test_demo_gguf_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"give a path ending in \.gguf"):
        write_demo_gguf(tmp_path / "folder")
    (tmp_path / "taken.gguf").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="exists; choose a new path or pass --force"):
        write_demo_gguf(tmp_path / "taken.gguf")
    with pytest.raises(InvalidArgument, match="unknown GGUF type 'q2'"):
        write_demo_gguf(tmp_path / "x.gguf", gguf_type="q2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]  # nothing half-written left behind


def test_demo_model_cli_writes_a_gguf(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["demo-model", str(tmp_path / "t.gguf"), "--format", "gguf", "--gguf-type", "q8_0"]
    )
    assert result.exit_code == 0, result.output
    assert "llama tiny q8_0 GGUF, 217,408 params" in result.output
    assert read_gguf_facts(tmp_path / "t.gguf").file_type == "q8_0"
    wrong = CliRunner().invoke(main, ["demo-model", str(tmp_path / "x"), "--gguf-type", "q8_0"])
    assert (
        wrong.exit_code != 0
        and "--gguf-type, --gguf-split-tensors and --gguf-experts apply to --format gguf only"
        in (" ".join(wrong.output.split()))
    )
    moe = CliRunner().invoke(main, ["demo-model", str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-experts", "4"])
    assert moe.exit_code == 0, moe.output
    assert (read_gguf_facts(tmp_path / "m.gguf").experts, read_gguf_facts(tmp_path / "m.gguf").experts_per_token) == (
        4,
        2,
    )
    split = CliRunner().invoke(
        main, ["demo-model", str(tmp_path / "s" / "t.gguf"), "--format", "gguf", "--gguf-split-tensors", "8"]
    )
    assert split.exit_code == 0, split.output
    assert f"wrote {tmp_path / 's' / 't-00001-of-00003.gguf'}" in split.output
    assert read_gguf_facts(tmp_path / "s" / "t-00001-of-00003.gguf").shards == 3


def test_a_gguf_source_passes_the_servers_start_up_check(tiny_gguf: Path, tmp_path: Path) -> None:
    """``memserve serve`` checks every source before it starts: a GGUF file (or a folder holding one) is read from
    its own header, not refused as a file without config.json; a truncated one is refused there."""
    assert check_source(str(tiny_gguf)).note == f"GGUF file {tiny_gguf}"
    assert check_source(str(tiny_gguf.parent)).note == f"GGUF file {tiny_gguf}"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:64])
    with pytest.raises(CheckpointError):
        check_source(str(cut))
