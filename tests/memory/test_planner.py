"""The ladder as tables over simulated hosts: no torch, no processes, no real devices."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from memserve.checkpoint.facts import CheckpointFacts, facts_from
from memserve.engines.fit import fit_json
from memserve.errors import InvalidArgument
from memserve.memory.estimate import (
    CPU_GENERATE_RUNTIME_BYTES,
    CPU_RUNTIME_BYTES,
    GENERATE,
    GPU_RUNTIME_BYTES,
    activation_bytes,
    kv_cache_bytes,
    paged_tokens,
)
from memserve.memory.fit import PlanFile
from memserve.memory.inventory import Device, Inventory
from memserve.memory.planner import Plan, Policy, Request, plan
from memserve.units import format_bytes
from tests.fakes import (
    LLAMA2_70B,
    LLAMA3_8B,
    MISTRAL_7B,
    MIXTRAL_8X7B,
    QWEN2_05B,
    QWEN25_14B,
    GiB,
    tensors_for,
)

MiB = 1024**2


def facts(config: dict, st_dtype: str = "BF16", name: str = "m", **extra: object) -> CheckpointFacts:
    return facts_from({**config, **extra}, tensors_for(config, st_dtype), source=name)


def cpu(total_gib: float, free_gib: float | None = None) -> Device:
    total = int(total_gib * GiB)
    free = int(free_gib * GiB) if free_gib is not None else total - GiB
    return Device("cpu", "cpu", total, free, headroom_bytes=512 * MiB, description=f"RAM {total_gib} GiB")


def gpu(index: int, total_gib: float, cc: tuple[int, int] = (8, 9), name: str = "GPU") -> Device:
    total = int(total_gib * GiB)
    return Device(
        f"cuda:{index}",
        "cuda",
        total,
        total - 300 * MiB,
        headroom_bytes=512 * MiB,
        description=name,
        compute_capability=cc,
    )


L4 = Inventory((cpu(64), gpu(0, 24, name="NVIDIA L4")), bitsandbytes=True)
L4_NO_BNB = replace(L4, bitsandbytes=False)
H100 = Inventory((cpu(256), gpu(0, 80, (9, 0), "NVIDIA H100 80GB")), bitsandbytes=True)
TWO_24 = Inventory((cpu(128), gpu(0, 24, name="RTX 4090"), gpu(1, 24, name="RTX 4090")), bitsandbytes=True)
T4 = Inventory((cpu(32), gpu(0, 16, (7, 5), "Tesla T4")), bitsandbytes=True)
CPU_16 = Inventory((cpu(16),))
# what probe.cpu_device makes of an 8 GiB cgroup v2 limit on a 64 GiB host (see test_probe)
CONTAINER_8 = Inventory(
    (
        Device(
            "cpu",
            "cpu",
            8 * GiB,
            7 * GiB,
            headroom_bytes=512 * MiB,
            description="cgroup v2 limit 8.0 GiB (host RAM 64.0 GiB)",
        ),
    )
)

# host, model, request → expected rung ("nofit" when nothing fits)
LADDER = [
    ("L4 24GB: 8B bf16 on the GPU", L4, LLAMA3_8B, Request(8192), "gpu"),
    ("L4 24GB: 14B bf16 does not fit, int8 does", L4, QWEN25_14B, Request(8192), "gpu-int8"),
    ("L4 24GB: 14B with --quantization 4bit", L4, QWEN25_14B, Request(8192, quantization="4bit"), "gpu-4bit"),
    ("L4 24GB, no bitsandbytes: 14B splits GPU+CPU", L4_NO_BNB, QWEN25_14B, Request(8192), "gpu-cpu-split"),
    ("L4 24GB: 14B, quantization none", L4, QWEN25_14B, Request(8192, quantization="none"), "gpu-cpu-split"),
    ("H100 80GB: 14B bf16", H100, QWEN25_14B, Request(32768, 4), "gpu"),
    ("H100 80GB: 70B only as int8", H100, LLAMA2_70B, Request(4096), "gpu-int8"),
    ("H100 80GB: Mixtral 8x7B bf16 too big, int8 fits", H100, MIXTRAL_8X7B, Request(4096), "gpu-int8"),
    ("2x24GB: 14B bf16 across both GPUs", TWO_24, QWEN25_14B, Request(8192), "gpu"),
    ("CPU 16GB: 0.5B on CPU", CPU_16, QWEN2_05B, Request(4096, 4), "cpu"),
    ("CPU 16GB: 8B bf16 too big, int8 fits", CPU_16, LLAMA3_8B, Request(4096), "cpu-int8"),
    ("CPU 16GB: 8B, int8 asked, no GPU", CPU_16, LLAMA3_8B, Request(4096, quantization="int8"), "cpu-int8"),
    ("CPU 16GB: 8B, 4bit asked", CPU_16, LLAMA3_8B, Request(4096, quantization="4bit"), "cpu-4bit"),
    ("CPU 16GB: 8B, quantization none", CPU_16, LLAMA3_8B, Request(4096, quantization="none"), "nofit"),
    ("CPU 16GB: 14B neither bf16 nor int8 fits, 4-bit does", CPU_16, QWEN25_14B, Request(4096), "cpu-4bit"),
    ("CPU 16GB: 14B, int8 asked", CPU_16, QWEN25_14B, Request(4096, quantization="int8"), "nofit"),
    ("CPU 16GB: 0.5B, int8 asked", CPU_16, QWEN2_05B, Request(4096), "cpu"),
    ("8GiB container: 0.5B fits", CONTAINER_8, QWEN2_05B, Request(8192), "cpu"),
    ("8GiB container: 8B refused, even as 4-bit", CONTAINER_8, LLAMA3_8B, Request(4096), "nofit"),
    ("8GiB container: Mistral 7B as 4-bit", CONTAINER_8, MISTRAL_7B, Request(4096), "cpu-4bit"),
    (
        "8GiB container: 0.5B x64 long contexts needs a smaller context",
        CONTAINER_8,
        QWEN2_05B,
        Request(32768, 64, min_context_tokens=1024),
        "smaller-context",
    ),
]


@pytest.mark.parametrize(
    ("host", "config", "request_", "expected"), [case[1:] for case in LADDER], ids=[case[0] for case in LADDER]
)
def test_ladder(host: Inventory, config: dict, request_: Request, expected: str) -> None:
    result = plan(facts(config), request_, host)
    chosen = result.plan.rung if result.plan else "nofit"
    assert chosen == expected, [(r.name, r.why) for r in result.rungs]
    assert [r.name for r in result.rungs] == [
        "gpu",
        "gpu-int8",
        "gpu-4bit",
        "gpu-cpu-split",
        "cpu",
        "cpu-int8",
        "cpu-4bit",
        "smaller-context",
    ]
    if result.plan:
        assert result.nofit is None
        # never reserve more than a device can give after headroom and budget
        for name, need in result.plan.devices.items():
            device = host.get(name)
            assert device is not None
            assert need.total_bytes <= device.usable_bytes
            assert need.free_bytes == device.usable_bytes
        # every block is placed on a device of the plan
        assert set(result.plan.device_map.values()) <= set(result.plan.devices)
        # rungs before the chosen one did not fit or were not allowed
        index = [r.name for r in result.rungs].index(result.plan.rung)
        assert not any(r.fits for r in result.rungs[:index])
    else:
        assert result.nofit is not None
        assert any(n.total_bytes > n.free_bytes for n in result.nofit.needed.values())


def test_gpu_rung_puts_whole_model_on_gpu_with_its_parts() -> None:
    f = facts(LLAMA3_8B)
    result = plan(f, Request(8192, 2), L4)
    assert result.plan is not None
    need = result.plan.devices["cuda:0"]
    assert need.weights_bytes == f.weights_bytes  # bf16 as stored: the header bytes exactly
    # 2 (K, V) × 32 layers × 8 KV heads × 128 head dim × 2 B per token, for the pages of 2 × 8192 tokens
    assert need.kv_cache_bytes == 2 * 32 * 8 * 128 * 2 * paged_tokens(8192, 2) >= 2 * 32 * 8 * 128 * 2 * 8192 * 2
    assert need.runtime_bytes == GPU_RUNTIME_BYTES
    assert need.activation_bytes > 0
    # the process driving the GPU still needs host RAM
    assert result.plan.devices["cpu"].runtime_bytes > CPU_RUNTIME_BYTES
    assert result.plan.devices["cpu"].weights_bytes == 0


def test_quantized_weights_are_repriced_but_embeddings_stay() -> None:
    f = facts(QWEN25_14B)
    result = plan(f, Request(4096), L4)
    rungs = {r.name: r for r in result.rungs}
    bf16 = rungs["gpu"].devices["cuda:0"].weights_bytes
    int8 = rungs["gpu-int8"].devices["cuda:0"].weights_bytes
    nf4 = rungs["gpu-4bit"].devices["cuda:0"].weights_bytes
    unquantized = (f.params - f.quantizable_params) * 2  # embeddings, head, norms, biases in bf16
    assert bf16 == f.weights_bytes
    assert int8 == pytest.approx(unquantized + f.quantizable_params, rel=0.002)
    assert nf4 == pytest.approx(unquantized + f.quantizable_params * (0.5 + 4 / 64), rel=0.002)
    assert nf4 < int8 < bf16


@pytest.mark.parametrize(
    ("st_dtype", "dtype", "width"), [("BF16", "bfloat16", 2), ("F32", "float32", 4), ("F16", "float16", 2)]
)
def test_cpu_quantized_weights_are_priced_as_torchs_kernels_store_them(st_dtype: str, dtype: str, width: int) -> None:
    """int8: a byte per weight and an fp32 scale per row (oneDNN's kernel; the weight-only one's are no wider);
    4-bit: half a byte and a scale and zero per 32 weights of a row, in the compute dtype (fp16 checkpoints
    compute in bf16 on CPU); embeddings, head, norms as stored."""
    f = facts(LLAMA3_8B, st_dtype, dtype=dtype)
    result = plan(f, Request(4096), Inventory((cpu(256),)))
    rungs = {r.name: r for r in result.rungs}
    rows = sum(b.quantizable_rows for b in f.blocks)
    q = f.quantizable_params
    unquantized = (f.params - q) * width
    assert rungs["cpu"].devices["cpu"].weights_bytes == f.weights_bytes
    assert rungs["cpu-int8"].devices["cpu"].weights_bytes == unquantized + q + rows * 4
    assert rungs["cpu-4bit"].devices["cpu"].weights_bytes == unquantized + q // 2 + q // 32 * 2 * width
    for name in ("cpu-int8", "cpu-4bit"):  # the rest of the plan is the cpu rung's
        assert rungs[name].dtype == rungs["cpu"].dtype == ("bfloat16" if dtype == "float16" else dtype)
        assert rungs[name].quantization == name.removeprefix("cpu-")
        for part in ("kv_cache_bytes", "activation_bytes", "runtime_bytes"):
            assert getattr(rungs[name].devices["cpu"], part) == getattr(rungs["cpu"].devices["cpu"], part)
        assert set(rungs[name].device_map.values()) == {"cpu"}


def test_cpu_quantized_rungs_need_no_bitsandbytes_and_honour_quantization() -> None:
    f = facts(LLAMA3_8B)
    assert not CPU_16.bitsandbytes
    chosen = {
        asked: plan(f, Request(4096, quantization=asked), Inventory((cpu(64),))).plan
        for asked in ("auto", "none", "int8", "4bit")
    }
    assert {asked: p.rung if p else None for asked, p in chosen.items()} == {
        "auto": "cpu",
        "none": "cpu",
        "int8": "cpu-int8",
        "4bit": "cpu-4bit",
    }
    assert chosen["int8"] is not None and chosen["int8"].quantization == "int8"
    rungs = {r.name: r for r in plan(f, Request(4096, quantization="int8"), Inventory((cpu(64),))).rungs}
    assert "--quantization int8 asks for quantized weights" in rungs["cpu"].why
    assert "--quantization int8 rules out 4bit" in rungs["cpu-4bit"].why
    # a CPU-only policy never picks a GPU rung, a GPU-only one never a CPU rung
    gpu_only = plan(f, Request(4096), L4, Policy(allow_cpu=False))
    assert all(not r.available for r in gpu_only.rungs if r.name.startswith("cpu"))


def test_cpu_quantized_rungs_are_blocked_where_the_kernels_cannot_do_what_is_priced() -> None:
    moe = plan(facts(MIXTRAL_8X7B), Request(4096), Inventory((cpu(512),)), Policy().below("cpu")).rungs
    for rung in (r for r in moe if r.name in ("cpu-int8", "cpu-4bit")):
        assert not rung.available and "experts are fused tensors" in rung.why
    odd = facts(QWEN2_05B, intermediate_size=4860)  # not a multiple of 32
    rungs = {r.name: r for r in plan(odd, Request(2048), CPU_16, Policy().below("cpu")).rungs}
    assert rungs["cpu-int8"].fits
    assert not rungs["cpu-4bit"].available and "multiples of 32; this model has 4860" in rungs["cpu-4bit"].why


def test_a_cpu_quantized_plan_round_trips_through_its_json() -> None:
    chosen = plan(facts(LLAMA3_8B), Request(2048), CPU_16).plan
    assert chosen is not None and chosen.rung == "cpu-int8"
    assert Plan.from_json(json.loads(json.dumps(chosen.to_json()))) == chosen


def test_split_packs_layers_in_order_and_puts_the_rest_on_cpu() -> None:
    result = plan(facts(QWEN25_14B), Request(8192), L4_NO_BNB)
    assert result.plan is not None and result.plan.rung == "gpu-cpu-split"
    dm = result.plan.device_map
    devices_in_order = [dm[b] for b in ["embed", *(f"layer.{i}" for i in range(48)), "head"]]
    first_cpu = devices_in_order.index("cpu")
    assert set(devices_in_order[:first_cpu]) == {"cuda:0"}
    assert set(devices_in_order[first_cpu:]) == {"cpu"}
    assert result.plan.devices["cpu"].weights_bytes > 0


def test_two_gpus_share_the_layers() -> None:
    result = plan(facts(QWEN25_14B), Request(8192), TWO_24)
    assert result.plan is not None
    assert result.plan.devices["cuda:0"].weights_bytes > 0
    assert result.plan.devices["cuda:1"].weights_bytes > 0


def test_fp32_checkpoint_runs_bf16_on_ampere_fp16_on_turing_and_as_stored_on_cpu() -> None:
    small = facts(QWEN2_05B, "F32", dtype="float32")
    assert plan(small, Request(4096), L4).plan.dtype == "bfloat16"  # type: ignore[union-attr]
    assert plan(small, Request(4096), T4).plan.dtype == "float16"  # type: ignore[union-attr]
    on_cpu = plan(small, Request(4096), CPU_16).plan
    assert on_cpu is not None and on_cpu.dtype == "float32"
    assert on_cpu.devices["cpu"].weights_bytes == small.weights_bytes


def test_sliding_window_caps_kv_cache() -> None:
    mistral = facts(MISTRAL_7B)
    assert mistral.sliding_window == 4096 and mistral.sliding_window_layers == 32
    assert mistral.kv_bytes(32768) == mistral.kv_bytes(4096) == 4096 * mistral.kv_bytes_per_token()
    llama = facts(LLAMA3_8B)
    assert llama.kv_bytes(32768) == 32768 * llama.kv_bytes_per_token()


def test_prequantized_checkpoint_is_priced_as_stored_and_needs_a_gpu() -> None:
    gptq = facts(LLAMA3_8B, quantization_config={"quant_method": "gptq", "bits": 4})
    result = plan(gptq, Request(4096), L4)
    assert result.plan is not None and result.plan.rung == "gpu"
    assert result.plan.devices["cuda:0"].weights_bytes == gptq.weights_bytes
    rungs = {r.name: r for r in result.rungs}
    assert not rungs["gpu-int8"].available and "already quantized" in rungs["gpu-int8"].why
    on_cpu = plan(gptq, Request(4096), Inventory((cpu(256),)))
    assert on_cpu.plan is None and on_cpu.nofit is not None
    cpu_rung = next(r for r in on_cpu.rungs if r.name == "cpu")
    assert "gptq" in cpu_rung.why and "GPU" in cpu_rung.why


def test_smaller_context_is_the_largest_that_fits_and_never_below_the_floor() -> None:
    f = facts(QWEN2_05B)
    request = Request(32768, 64, quantization="none", min_context_tokens=1024)
    result = plan(f, request, CONTAINER_8)
    assert result.plan is not None and result.plan.rung == "smaller-context"
    context = result.plan.context_tokens
    assert 1024 <= context < 32768
    assert context % 256 == 0
    bigger = plan(f, replace(request, context_tokens=context + 256, min_context_tokens=None), CONTAINER_8)
    assert bigger.plan is None  # one step more would not fit
    # without a floor the smaller context is offered, not taken
    refused = plan(f, replace(request, min_context_tokens=None), CONTAINER_8)
    assert refused.plan is None and refused.nofit is not None
    assert any(f"--context {context}" in a for a in refused.nofit.alternatives)


def test_nofit_names_needed_and_free_bytes_and_the_nearest_options() -> None:
    result = plan(
        facts(QWEN25_14B, name="qwen2.5-14b"),
        Request(8192, quantization="none"),
        L4_NO_BNB,
        Policy(allow_split=False, allow_cpu=False),
    )
    assert result.plan is None and result.nofit is not None
    message = result.nofit.message
    assert message.startswith("qwen2.5-14b does not fit")
    assert "cuda:0 needs" in message and "usable" in message and "weights" in message
    assert result.nofit.closest_rung == "gpu"
    assert any("gpu-cpu-split" in a for a in result.nofit.alternatives)

    quant_refused = plan(
        facts(QWEN25_14B), Request(8192, quantization="none"), L4, Policy(allow_split=False, allow_cpu=False)
    )
    assert quant_refused.nofit is not None
    assert any("gpu-int8" in a and "--quantization none" in a for a in quant_refused.nofit.alternatives)


def test_nofit_offers_lower_concurrency() -> None:
    result = plan(facts(QWEN2_05B), Request(32768, 64), CONTAINER_8)
    assert result.nofit is not None
    assert any("--concurrency" in a for a in result.nofit.alternatives)


def test_budget_and_headroom_bound_the_plan() -> None:
    host = Inventory((replace(cpu(64), budget_bytes=2 * GiB, headroom_bytes=GiB),))
    assert host.cpu.usable_bytes == GiB
    assert plan(facts(QWEN2_05B), Request(2048, quantization="none"), host).plan is None
    roomy = Inventory((replace(cpu(64), budget_bytes=4 * GiB, headroom_bytes=GiB),))
    assert plan(facts(QWEN2_05B), Request(2048), roomy).plan is not None


def test_policy_can_forbid_devices() -> None:
    f = facts(QWEN2_05B)
    assert plan(f, Request(2048), L4, Policy(allow_gpu=False)).plan.rung == "cpu"  # type: ignore[union-attr]
    only_gpu = plan(f, Request(2048), L4, Policy(allow_cpu=False)).plan
    assert only_gpu is not None and only_gpu.rung == "gpu"


@pytest.mark.parametrize(
    ("failed", "next_rung"),
    [
        ("gpu", "gpu-int8"),
        ("gpu-int8", "gpu-4bit"),
        ("gpu-4bit", "gpu-cpu-split"),
        ("gpu-cpu-split", "cpu"),
        ("cpu", "cpu-int8"),
        ("cpu-int8", "cpu-4bit"),
    ],
)
def test_retry_lower_skips_the_failed_rung_and_those_above(failed: str, next_rung: str) -> None:
    f = facts(QWEN2_05B)
    result = plan(f, Request(2048), L4, Policy().below(failed))
    assert result.plan is not None and result.plan.rung == next_rung
    skipped = {r.name: r.why for r in result.rungs if not r.available}
    assert failed in skipped and "more memory than planned" in skipped[failed]


def test_nothing_below_cpu_4bit_without_a_smaller_context_allowed() -> None:
    f = facts(QWEN2_05B)
    assert plan(f, Request(2048), CPU_16, Policy().below("cpu-4bit")).plan is None
    assert plan(f, Request(2048, min_context_tokens=512), CPU_16, Policy().below("smaller-context")).plan is None


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (Request(0), "positive"),
        (Request(-5), "positive"),
        (Request(10**9), "max_position_embeddings"),
        (Request(2048, 0), "concurrency"),
        (Request(2048, quantization="fp3"), "unknown quantization"),  # type: ignore[arg-type]
        (Request(2048, min_context_tokens=4096), "min context"),
        (Request(2048, max_batch_tokens=0), "max batch tokens"),
    ],
)
def test_bad_requests_are_refused_in_one_line(request_: Request, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment) as info:
        plan(facts(QWEN2_05B), request_, CPU_16)
    assert "\n" not in info.value.message


def test_cgroup_limited_host_from_the_probe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 64 GiB host inside an 8 GiB cgroup v2 limit: psutil alone would say the 8B model fits."""
    from collections import namedtuple

    from memserve.memory.probe import cgroup_memory, probe_inventory

    proc = tmp_path / "cgroup"
    proc.write_text("0::/app\n")
    group = tmp_path / "sys" / "app"
    group.mkdir(parents=True)
    (group / "memory.max").write_text(str(8 * GiB))
    (group / "memory.current").write_text(str(GiB))
    (group / "memory.stat").write_text(f"anon 100\ninactive_file {256 * MiB}\n")
    limit = cgroup_memory(proc, tmp_path / "sys")
    assert limit is not None and limit.limit_bytes == 8 * GiB
    vm = namedtuple("vm", "total available")(64 * GiB, 60 * GiB)
    host = probe_inventory(cgroup=limit, virtual_memory=lambda: vm, nvml=object())
    assert host.cpu.total_bytes == 8 * GiB
    assert host.cpu.free_bytes == 8 * GiB - (GiB - 256 * MiB)
    assert plan(facts(QWEN2_05B), Request(4096), host).plan is not None
    refused = plan(facts(LLAMA3_8B, name="llama-3-8b"), Request(4096, quantization="none"), host)
    assert refused.plan is None and refused.nofit is not None
    need = refused.nofit.needed["cpu"]
    assert need.total_bytes > 16 * 10**9 and need.free_bytes == 8 * GiB - (GiB - 256 * MiB) - 512 * MiB
    assert "cpu needs 1" in refused.nofit.message and "6.8 GiB usable" in refused.nofit.message
    without_cgroup = probe_inventory(cgroup=None, virtual_memory=lambda: vm, nvml=object())
    assert plan(facts(LLAMA3_8B), Request(4096), without_cgroup).plan is not None


def test_nofit_when_the_only_rung_that_fits_is_skipped_says_so_whole() -> None:
    """A CPU-only host whose cpu rungs the watchdog ruled out: the message names the rung, its size and why."""
    result = plan(facts(QWEN2_05B, name="demo-small"), Request(2048), CPU_16, Policy().below("cpu-4bit"))
    assert result.plan is None and result.nofit is not None
    cpu_need = result.nofit.needed["cpu"]
    assert cpu_need.fits  # the premise: it is not too big, it is ruled out
    size = f"{format_bytes(cpu_need.total_bytes)} of {format_bytes(cpu_need.free_bytes)} usable"
    lighter = {
        r.name: f"{format_bytes(r.total_bytes)} of {format_bytes(r.devices['cpu'].free_bytes)}"
        for r in result.rungs
        if r.name in ("cpu-int8", "cpu-4bit")
    }
    assert result.nofit.message == (
        f"demo-small has no allowed placement on this host; cpu would fit (cpu {size}) but a runner on this "
        "rung or one above it used more memory than planned, so it is skipped. Nearest options: cpu-int8 (cpu "
        f"{lighter['cpu-int8']} usable), cpu-4bit (cpu {lighter['cpu-4bit']} usable) would fit but a runner on this "
        "rung or one above it used more memory than planned, so it is skipped"
    )
    assert result.nofit.closest_blocked is not None


def test_nofit_for_a_model_too_big_for_every_rung_names_each_part() -> None:
    result = plan(facts(LLAMA2_70B, name="llama-2-70b"), Request(4096), CPU_16)
    assert result.nofit is not None
    need = result.nofit.needed["cpu"]
    assert result.nofit.message == (
        f"llama-2-70b does not fit on this host; closest is cpu-4bit: cpu needs {format_bytes(need.total_bytes)} "
        f"(weights {format_bytes(need.weights_bytes)}, KV cache {format_bytes(need.kv_cache_bytes)}, activations "
        f"{format_bytes(need.activation_bytes)}, runtime {format_bytes(need.runtime_bytes)}) but has "
        f"{format_bytes(need.free_bytes)} usable. Free memory, raise --memory, or choose a smaller model"
    )


def test_rungs_ruled_out_for_the_same_reason_are_offered_in_one_line() -> None:
    result = plan(facts(QWEN2_05B, name="q"), Request(2048), L4, Policy().below("cpu-4bit"))
    assert result.nofit is not None and result.nofit.closest_rung == "gpu"
    assert "q has no allowed placement on this host; gpu would fit (cuda:0 " in result.nofit.message
    [line] = result.nofit.alternatives
    assert line.startswith("gpu-int8 (cuda:0 ") and "), cpu (cpu " in line and "), cpu-4bit (cpu " in line
    assert line.endswith(
        " would fit but a runner on this rung or one above it used more memory than planned, so it is skipped"
    )
    for text in (result.nofit.message, *(r.why for r in result.rungs)):
        assert "if allowed" not in text and ": ." not in text and "would fits" not in text


# ------------------------------------------------------------------------------------ the plan file


@pytest.mark.parametrize("host", [L4, TWO_24, CPU_16], ids=["gpu", "two gpus", "cpu"])
def test_a_plan_round_trips_through_its_json(host: Inventory) -> None:
    chosen = plan(facts(QWEN2_05B), Request(context_tokens=2048, concurrency=2), host).plan
    assert chosen is not None
    assert Plan.from_json(json.loads(json.dumps(chosen.to_json()))) == chosen


def test_the_generate_engine_is_planned_with_its_own_cache_activations_and_runtime() -> None:
    f = facts(QWEN2_05B)
    paged = plan(f, Request(context_tokens=2048, concurrency=4), CPU_16).plan
    generate = plan(f, Request(context_tokens=2048, concurrency=4, engine=GENERATE), CPU_16).plan
    assert paged is not None and generate is not None
    assert paged.engine == "continuous-batching" and generate.engine == "generate"
    need = generate.devices["cpu"]
    assert need.kv_cache_bytes == kv_cache_bytes(f, generate.dtype, 2048, 4, GENERATE)
    assert need.activation_bytes == activation_bytes(f, generate.dtype, 2048, 4, 2048, GENERATE)
    assert need.runtime_bytes == CPU_GENERATE_RUNTIME_BYTES
    assert need.total_bytes < paged.devices["cpu"].total_bytes
    # the runner reads which engine to build from the plan; a plan written before the field means the default
    assert Plan.from_json(generate.to_json()) == generate
    assert Plan.from_json({k: v for k, v in paged.to_json().items() if k != "engine"}) == paged


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rung", None, "'rung' must be str"),
        ("context_tokens", "2048", "'context_tokens' must be int"),
        ("concurrency", True, "'concurrency' must be int"),
        ("quantization", "8bit", "'quantization' must be one of none, int8, 4bit"),
        ("engine", "vllm", "'engine' must be one of continuous-batching, generate"),
        ("devices", {"cpu": {"weights_bytes": 1}}, "'kv_cache_bytes' must be int"),
    ],
)
def test_a_plan_with_a_missing_or_mistyped_field_is_an_invalid_argument(
    field: str, value: object, message: str
) -> None:
    chosen = plan(facts(QWEN2_05B), Request(context_tokens=2048), CPU_16).plan
    assert chosen is not None
    with pytest.raises(InvalidArgument, match=message):
        Plan.from_json({**chosen.to_json(), field: value})


def test_a_plan_file_is_fit_json_and_carries_the_pools_limits(tmp_path: Path) -> None:
    model_facts = facts(QWEN2_05B)
    request = Request(context_tokens=2048, concurrency=2)
    result = plan(model_facts, request, CPU_16)
    assert result.plan is not None
    fitted = tmp_path / "fit.json"
    fitted.write_text(json.dumps(fit_json(model_facts, request, result, CPU_16)))  # what memserve fit --json writes
    read = PlanFile.read(fitted)
    assert (read.source, read.plan, read.reserved_bytes, read.max_queue) == (
        model_facts.source,
        result.plan,
        None,
        None,
    )
    assert read.reservation_bytes == result.plan.reserved_bytes and read.queue == 4 * 2  # the defaults
    pooled = PlanFile(model_facts.source, result.plan, reserved_bytes={"cpu": 3 * GiB}, max_queue=5)
    assert pooled.to_json()["plan"]["reserved_bytes"] == {"cpu": 3 * GiB}  # where runners always read it
    assert PlanFile.from_json(json.loads(json.dumps(pooled.to_json()))) == pooled
    assert pooled.reservation_bytes == {"cpu": 3 * GiB} and pooled.queue == 5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"source": "m"}, "plan": None}, "no plan"),
        ({"plan": {}}, "no model source"),
        ({"model": {"source": "m"}, "plan": {"max_queue": -1}}, "max_queue must be a whole number"),
        ({"model": {"source": "m"}, "plan": {"reserved_bytes": {"cpu": "1G"}}}, "reserved_bytes must map"),
    ],
)
def test_a_plan_file_that_is_not_one_says_so(data: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        PlanFile.from_json(data)


def test_an_unreadable_plan_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidArgument, match=r"cannot read plan file .*bad\.json"):
        PlanFile.read(tmp_path / "bad.json")
