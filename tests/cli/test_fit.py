"""``memserve fit`` through click's runner: exit codes, the public JSON shape, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from memserve.cli import main
from memserve.memory.estimate import paged_tokens
from tests.fakes import LLAMA3_8B, QWEN2_05B, write_header_only, write_sparse_checkpoint


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def qwen(tmp_path: Path) -> Path:
    return write_sparse_checkpoint(tmp_path / "qwen2-0.5b", QWEN2_05B, shards=2)


def test_fit_json_has_the_public_shape(runner: CliRunner, qwen: Path) -> None:
    result = runner.invoke(
        main,
        [
            "fit",
            str(qwen),
            "--memory",
            "cpu=3GiB",
            "--headroom",
            "256MiB",
            "--context",
            "2048",
            "--concurrency",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["params"] == 494_032_768
    assert data["model"]["weights_bytes"] == 2 * 494_032_768
    assert data["model"]["kv_bytes_per_token"] == 12_288
    assert data["request"]["context_tokens"] == 2048 and data["request"]["concurrency"] == 2
    assert [r["name"] for r in data["rungs"]][-4:] == ["cpu", "cpu-int8", "cpu-4bit", "smaller-context"]
    assert all({"name", "fits", "why", "devices"} <= set(r) for r in data["rungs"])
    plan = data["plan"]
    assert plan["rung"] == "cpu" and plan["dtype"] == "bfloat16" and plan["quantization"] == "none"
    assert plan["context_tokens"] == 2048 and plan["concurrency"] == 2
    cpu = plan["devices"]["cpu"]
    assert set(cpu) == {
        "weights_bytes",
        "kv_cache_bytes",
        "activation_bytes",
        "runtime_bytes",
        "total_bytes",
        "free_bytes",
    }
    assert cpu["kv_cache_bytes"] == 12_288 * paged_tokens(2048, 2) >= 12_288 * 2048 * 2  # whole pages of the cache
    assert cpu["total_bytes"] == sum(
        cpu[k] for k in ("weights_bytes", "kv_cache_bytes", "activation_bytes", "runtime_bytes")
    )
    assert cpu["free_bytes"] <= 3 * 1024**3 - 256 * 1024**2
    assert data["nofit"] is None


def test_fit_table_shows_the_ladder_and_plan(runner: CliRunner, qwen: Path) -> None:
    result = runner.invoke(main, ["fit", str(qwen), "--memory", "cpu=3GiB"])
    assert result.exit_code == 0, result.output
    for text in ("placement ladder", "gpu-int8", "no CUDA GPU", "plan: cpu", "KV cache"):
        assert text in result.stdout


def test_nothing_fits_exits_3_with_the_nofit_message(runner: CliRunner, tmp_path: Path) -> None:
    model = write_sparse_checkpoint(tmp_path / "llama-3-8b", LLAMA3_8B, shards=4)
    result = runner.invoke(main, ["fit", str(model), "--memory", "cpu=6GiB", "--json"])  # 4-bit needs 7.2 GiB
    assert result.exit_code == 3
    data = json.loads(result.stdout)
    assert data["plan"] is None
    assert "does not fit" in data["nofit"]["message"]
    assert data["nofit"]["needed"]["cpu"]["total_bytes"] > data["nofit"]["needed"]["cpu"]["free_bytes"]
    table = runner.invoke(main, ["fit", str(model), "--memory", "cpu=6GiB"])
    assert table.exit_code == 3
    assert "no fit:" in table.stderr and "cpu needs" in table.stderr


def test_min_context_lets_the_planner_shrink_the_context(runner: CliRunner, qwen: Path) -> None:
    args = ["fit", str(qwen), "--memory", "cpu=3GiB", "--context", "32768", "--concurrency", "8", "--json"]
    refused = runner.invoke(main, args)
    assert refused.exit_code == 3
    assert any("--context" in a for a in json.loads(refused.stdout)["nofit"]["alternatives"])
    shrunk = runner.invoke(main, [*args, "--min-context", "1024"])
    assert shrunk.exit_code == 0, shrunk.output
    plan = json.loads(shrunk.stdout)["plan"]
    assert plan["rung"] == "smaller-context" and 1024 <= plan["context_tokens"] < 32768


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["fit", "/no/such/model"], "no such file or directory"),
        (["fit", "{qwen}", "--context", "-5"], "context must be a positive"),
        (["fit", "{qwen}", "--context", "99999999"], "max_position_embeddings 32768"),
        (["fit", "{qwen}", "--quantization", "fp3"], "unknown quantization 'fp3'"),
        (["fit", "{qwen}", "--concurrency", "0"], "concurrency must be between"),
        (["fit", "{qwen}", "--memory", "cpu=lots"], "cannot read --memory size for cpu 'lots'"),
        (["fit", "{qwen}", "--memory", "tpu:0=4GiB"], "unknown device 'tpu:0'"),
        (["fit", "{qwen}", "--memory", "cuda:3=4GiB"], "cuda:3"),
        (["fit", "{qwen}", "--context", "abc"], "'abc' is not a valid integer"),
        (["fit", "{corrupt}"], "corrupt or truncated"),
        (["fit", "{truncated}"], "truncated"),
    ],
)
def test_bad_input_is_one_line_without_traceback(
    runner: CliRunner, qwen: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    corrupt = tmp_path / "corrupt"
    write_sparse_checkpoint(corrupt, QWEN2_05B)
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 16)
    truncated = tmp_path / "truncated"
    write_sparse_checkpoint(truncated, QWEN2_05B)
    write_header_only(truncated / "model.safetensors", {"w": ("F32", [1000])}, truncate_by=8)
    args = [a.format(qwen=qwen, corrupt=corrupt, truncated=truncated) for a in args]
    result = runner.invoke(main, args)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
