"""llama.cpp's pricing and llama-server's argv as tables over simulated hosts: no process, no llama.cpp."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from memserve.checkpoint.facts import Block
from memserve.checkpoint.gguf import GgufFacts
from memserve.engines import llamacpp
from memserve.engines.llamacpp import (
    CPU_RUNTIME_BYTES,
    arguments,
    compute_bytes,
    executable,
    gpu_layers,
    kv_cache_bytes,
    kv_tokens,
    output_bytes,
    plan,
    runtime_bytes,
    work_bytes,
)
from memserve.errors import CheckpointError, InvalidArgument, RunnerFailed
from memserve.memory.estimate import GPU_RUNTIME_BYTES
from memserve.memory.fit import PlanFile
from memserve.memory.inventory import Device, Inventory
from memserve.memory.planner import Policy, Request

MiB = 1024**2
GiB = 1024**3


def gguf(
    *,
    layers: int = 32,
    hidden: int = 4096,
    ffn: int = 14336,
    heads: int = 32,
    kv_heads: int = 8,
    vocab: int = 128256,
    layer_bytes: int = 120 * MiB,
    embed_bytes: int = 280 * MiB,
    head_bytes: int = 400 * MiB,
    file_type: str = "q4_k_m",
    context: int | None = 8192,
) -> GgufFacts:
    """A Llama-3-8B-shaped GGUF (Q4_K_M-like sizes) unless told otherwise."""
    blocks = (
        Block("embed", 0, embed_bytes),
        *(Block(f"layer.{i}", 0, layer_bytes) for i in range(layers)),
        Block("head", 0, head_bytes),
    )
    total = sum(b.bytes for b in blocks)
    return GgufFacts(
        source="models/llama-3-8b.Q4_K_M.gguf", path="/m/llama-3-8b.Q4_K_M.gguf", architecture="llama", name=None,
        file_type=file_type, params=8 * 10**9, weights_bytes=total, params_by_type={}, bytes_by_type={}, blocks=blocks,
        layers=layers, hidden_size=hidden, intermediate_size=ffn, heads=heads, kv_heads_by_layer=(kv_heads,) * layers,
        key_length=hidden // heads, value_length=hidden // heads, vocab_size=vocab, max_context_tokens=context,
        sliding_window=None, experts=None, experts_per_token=None, tensors=291, file_bytes=total,
    )  # fmt: skip


def cpu(gib: float) -> Device:
    return Device("cpu", "cpu", int(gib * GiB), int(gib * GiB), description=f"RAM {gib} GiB")


def gpu(gib: float) -> Device:
    return Device("cuda:0", "cuda", int(gib * GiB), int(gib * GiB), compute_capability=(8, 9), description="GPU")


def host(*devices: Device) -> Inventory:
    return Inventory(devices)


# ------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("context", "slots", "cells"),
    [
        (512, 1, 512),
        (100, 1, 256),  # padded to 256
        (4096, 4, 16_384),
        (300, 2, 1_024),  # 600 → 768 in all, 384 per slot → 512 each
        (1000, 3, 3_072),  # 3,000 → 3,072, 1,024 per slot
        (2048, 8, 16_384),
    ],
)
def test_kv_cells_follow_llama_cpp_padding(context: int, slots: int, cells: int) -> None:
    assert kv_tokens(context, slots) == cells


def test_kv_cache_is_layers_times_cells_times_k_and_v_in_f16() -> None:
    # Llama 3 8B: 32 layers × 8 KV heads × (128 + 128) × 2 bytes = 128 KiB a token; 4,096 cells = 512 MiB,
    # what llama.cpp prints for it ("KV buffer size = 512.00 MiB")
    assert kv_cache_bytes(gguf(), 4096, 1) == 512 * MiB
    assert kv_cache_bytes(gguf(), 1024, 4) == 512 * MiB


TINY = {"layers": 2, "hidden": 64, "ffn": 160, "heads": 4, "kv_heads": 2, "vocab": 1024}
SMALL = {"layers": 12, "hidden": 768, "ffn": 2048, "heads": 12, "kv_heads": 4, "vocab": 16384}


@pytest.mark.parametrize(
    ("dims", "context", "slots", "batch", "reported_mib"),
    [
        # llama-server's own "CPU compute buffer size" for the demo models (docs/gguf.md, measured)
        (TINY, 512, 2, 512, 1.95),
        (TINY, 512, 1, 512, 1.95),
        (TINY, 2048, 1, 2048, 13.80),
        (TINY, 1024, 4, 256, 1.22),
        (SMALL, 1024, 1, 512, 19.01),
        (SMALL, 1024, 2, 512, 19.01),
        (SMALL, 2048, 4, 512, 20.01),
        (SMALL, 2048, 2, 1024, 40.02),
    ],
)
def test_compute_buffer_is_what_llama_cpp_reserves(
    dims: dict[str, int], context: int, slots: int, batch: int, reported_mib: float
) -> None:
    assert compute_bytes(gguf(**dims), batch, context, slots) / MiB == pytest.approx(reported_mib, abs=0.02)


def test_large_vocabularies_reserve_one_output_per_slot() -> None:
    facts = gguf()  # 128k vocabulary: at 64 slots the logits outgrow the FFN's tensors
    logits = 64 * 128256 * 4
    assert compute_bytes(facts, 64, 1024, 1) < logits <= compute_bytes(facts, 64, 1024, 64)
    assert output_bytes(facts, 4) == 4 * 128256 * 4


# --------------------------------------------------------------------------------------------- plan


def test_cpu_host_gets_the_cpu_rung_with_every_part_priced() -> None:
    facts = gguf()
    result = plan(facts, Request(context_tokens=4096, concurrency=2, max_batch_tokens=512), host(cpu(32)))
    assert result.plan is not None and result.nofit is None
    chosen = result.plan
    assert (chosen.rung, chosen.runner, chosen.dtype, chosen.quantization) == ("cpu", "llama.cpp", "q4_k_m", "none")
    assert (chosen.context_tokens, chosen.concurrency, chosen.max_batch_tokens) == (4096, 2, 512)
    need = chosen.devices["cpu"]
    assert need.weights_bytes == facts.weights_bytes
    assert need.kv_cache_bytes == kv_cache_bytes(facts, 4096, 2) == 1 * GiB
    assert need.activation_bytes == (
        compute_bytes(facts, 512, 4096, 2) + work_bytes(facts, 512, 4096, 2) + output_bytes(facts, 2)
    )
    assert need.runtime_bytes == runtime_bytes(facts, 2) > CPU_RUNTIME_BYTES
    assert set(chosen.device_map.values()) == {"cpu"}
    assert [(r.name, r.fits, r.available, r.runner) for r in result.rungs] == [
        ("gpu", False, False, "llama.cpp"),
        ("gpu-cpu-split", False, False, "llama.cpp"),
        ("cpu", True, True, "llama.cpp"),
        ("smaller-context", False, False, "llama.cpp"),
    ]


def test_too_little_ram_is_a_nofit_with_the_nearest_options() -> None:
    result = plan(gguf(), Request(context_tokens=8192, concurrency=4), host(cpu(8)))
    assert result.plan is None and result.nofit is not None
    message = result.nofit.message
    assert "does not fit on this host; closest is cpu" in message
    assert "fits as cpu with --context" in message and "fits as cpu with --concurrency" in message
    assert "a smaller quantization of the model than q4_k_m" in message


def test_min_context_allows_the_smaller_context_rung() -> None:
    request = Request(context_tokens=8192, concurrency=4, min_context_tokens=1024)
    result = plan(gguf(), request, host(cpu(8)))
    assert result.plan is not None and result.plan.rung == "smaller-context"
    assert 1024 <= result.plan.context_tokens < 8192 and result.plan.context_tokens % 256 == 0
    assert result.plan.devices["cpu"].fits
    bigger = plan(gguf(), Request(context_tokens=result.plan.context_tokens + 256, concurrency=4), host(cpu(8)))
    assert bigger.plan is None  # the largest that fits


def test_a_gpu_that_holds_everything_offloads_every_layer_and_the_output() -> None:
    facts = gguf()
    result = plan(facts, Request(context_tokens=8192), host(cpu(32), gpu(24)))
    assert result.plan is not None and result.plan.rung == "gpu"
    assert gpu_layers(result.plan.device_map) == 33  # 32 layers + the output layer
    assert result.plan.device_map["embed"] == "cpu"  # llama.cpp keeps the token embeddings in host memory
    on_gpu = result.plan.devices["cuda:0"]
    assert on_gpu.weights_bytes == facts.weights_bytes - 280 * MiB
    assert on_gpu.kv_cache_bytes == kv_cache_bytes(facts, 8192, 1) and on_gpu.runtime_bytes == GPU_RUNTIME_BYTES
    assert result.plan.devices["cpu"].weights_bytes == 280 * MiB


def test_a_small_gpu_takes_the_top_layers_and_the_rest_stay_on_the_host() -> None:
    facts = gguf()
    small = gpu(3)
    result = plan(facts, Request(context_tokens=8192), host(cpu(32), small))
    assert result.plan is not None and result.plan.rung == "gpu-cpu-split"
    ngl = gpu_layers(result.plan.device_map)
    assert 0 < ngl < 33
    off = [b for b, d in result.plan.device_map.items() if d == "cuda:0"]
    # the output layer and the last ngl - 1 layers: what -ngl N offloads
    assert sorted(off) == sorted(["head", *(f"layer.{i}" for i in range(32 - (ngl - 1), 32))])
    assert result.plan.devices["cuda:0"].fits
    kv_layer = kv_cache_bytes(facts, 8192, 1) // 32
    assert result.plan.devices["cuda:0"].total_bytes + 120 * MiB + kv_layer > small.usable_bytes  # one more won't
    gpu_rung = next(r for r in result.rungs if r.name == "gpu")
    assert not gpu_rung.fits and "cuda:0 needs" in gpu_rung.why


def test_policy_keeps_a_gguf_off_the_gpu() -> None:
    result = plan(gguf(), Request(context_tokens=8192), host(cpu(32), gpu(24)), Policy(allow_gpu=False))
    assert result.plan is not None and result.plan.rung == "cpu"
    assert "GPUs are not allowed by policy" in next(r for r in result.rungs if r.name == "gpu").why


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (Request(context_tokens=16384), r"more than models/llama-3-8b\.Q4_K_M\.gguf supports \(context_length 8192\)"),
        (Request(context_tokens=1024, quantization="int8"), r"--quantization int8 does not apply to a GGUF model"),
        (Request(context_tokens=1024, concurrency=0), r"concurrency must be between 1 and"),
        (Request(context_tokens=0), r"context must be a positive number"),
        (Request(context_tokens=1024, min_context_tokens=2048), r"min context must be between 1 and the context"),
    ],
)
def test_requests_no_plan_could_mean(request_: Request, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        plan(gguf(), request_, host(cpu(32)))


def test_the_plan_survives_the_plan_file() -> None:
    chosen = plan(gguf(), Request(context_tokens=2048), host(cpu(32))).plan
    assert chosen is not None
    again = PlanFile.from_json(PlanFile("m.gguf", chosen).to_json()).plan
    assert again == chosen and again.runner == "llama.cpp"


# ----------------------------------------------------------------------------------------- arguments


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")
    return path


@pytest.fixture
def fake_server(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "llama-server"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_cpu_plan_arguments(model_file: Path, fake_server: Path) -> None:
    chosen = plan(gguf(), Request(context_tokens=4096, concurrency=4, max_batch_tokens=512), host(cpu(32))).plan
    assert chosen is not None
    argv = arguments(
        "llama-8b",
        PlanFile(str(model_file), chosen),
        host="127.0.0.1",
        port=41234,
        environ={"PATH": str(fake_server.parent)},
    )
    assert argv == [
        str(fake_server),
        "--model", str(model_file),
        "--alias", "llama-8b",
        "--host", "127.0.0.1",
        "--port", "41234",
        "--ctx-size", "16384",
        "--parallel", "4",
        "--cont-batching",
        "--batch-size", "512",
        "--ubatch-size", "512",
        "--gpu-layers", "0",
        "--fit", "off",
        "--cache-ram", "0",
        "--no-webui",
    ]  # fmt: skip


@pytest.mark.parametrize(("gpu_gib", "ngl"), [(24, "33"), (3, None)])
def test_gpu_plan_arguments_offload_the_planned_layers(
    model_file: Path, fake_server: Path, gpu_gib: float, ngl: str | None
) -> None:
    chosen = plan(gguf(), Request(context_tokens=8192), host(cpu(32), gpu(gpu_gib))).plan
    assert chosen is not None
    argv = arguments(
        "m",
        PlanFile(str(model_file), chosen),
        host="127.0.0.1",
        port=1,
        threads=3,
        environ={"PATH": str(fake_server.parent)},
    )
    expected = ngl or str(gpu_layers(chosen.device_map))
    assert argv[argv.index("--gpu-layers") + 1] == expected and argv[-2:] == ["--threads", "3"]


def test_the_command_comes_from_the_environment_split_like_a_shell(model_file: Path, fake_server: Path) -> None:
    environ = {"PATH": os.environ.get("PATH", ""), "MEMSERVE_LLAMA_SERVER_COMMAND": f"'{fake_server}' --verbose"}
    assert executable(environ) == [str(fake_server), "--verbose"]


def test_a_missing_llama_server_names_the_install(tmp_path: Path) -> None:
    with pytest.raises(RunnerFailed, match=r"llama-server is not installed .*scripts/build-llama-server\.sh"):
        executable({"PATH": str(tmp_path)})
    with pytest.raises(RunnerFailed, match=r"MEMSERVE_LLAMA_SERVER_COMMAND='/nope/llama-server' names"):
        executable({"PATH": str(tmp_path), "MEMSERVE_LLAMA_SERVER_COMMAND": "/nope/llama-server"})


def test_arguments_refuse_what_llama_cpp_cannot_serve(model_file: Path, fake_server: Path, tmp_path: Path) -> None:
    chosen = plan(gguf(), Request(context_tokens=2048), host(cpu(32))).plan
    assert chosen is not None
    environ = {"PATH": str(fake_server.parent)}
    from dataclasses import replace

    with pytest.raises(InvalidArgument, match=r"runs on transformers, not llama\.cpp"):
        arguments(
            "m", PlanFile(str(model_file), replace(chosen, runner="transformers")), host="h", port=1, environ=environ
        )
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a GGUF model"):
        arguments("m", PlanFile(str(tmp_path / "hf"), chosen), host="h", port=1, environ=environ)


def test_rungs_are_named_as_the_planner_names_them() -> None:
    from memserve.memory.planner import RUNGS

    assert set(llamacpp.RUNGS) <= set(RUNGS)  # so Policy.below and the watchdog's retry read them
