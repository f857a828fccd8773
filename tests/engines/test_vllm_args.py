"""vLLM's pricing and its plan → argv, as tables: no GPU, no vLLM, no process."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from memserve.checkpoint.facts import CheckpointFacts, facts_from
from memserve.engines import vllm
from memserve.errors import RunnerFailed
from memserve.memory.fit import PlanFile
from memserve.memory.inventory import Device, Inventory
from memserve.memory.planner import Policy, Request, Rung
from tests.engines.fake_vllm import parser
from tests.fakes import LLAMA3_8B, QWEN2_05B, GiB, tensors_for

MiB = 1 << 20
FAKE = {"MEMSERVE_VLLM_COMMAND": "/opt/vllm/bin/vllm"}
REQUEST = Request(context_tokens=4096, concurrency=4)


def facts(config: dict, **extra: object) -> CheckpointFacts:
    return facts_from({**config, **extra}, tensors_for(config), source="/models/m")


def host(*gpus: Device, cpu_gib: float = 64) -> Inventory:
    cpu = Device("cpu", "cpu", int(cpu_gib * GiB), int(cpu_gib * GiB) - GiB, headroom_bytes=512 * MiB)
    return Inventory((cpu, *gpus))


def card(index: int = 0, *, total_gib: float = 24, others_gib: float = 0, budget_gib: float | None = None) -> Device:
    """A GPU of ``total_gib`` with ``others_gib`` already held by another process (another model, say)."""
    total = int(total_gib * GiB)
    return Device(
        f"cuda:{index}",
        "cuda",
        total,
        total - int(others_gib * GiB) - 300 * MiB,
        budget_bytes=None if budget_gib is None else int(budget_gib * GiB),
        headroom_bytes=512 * MiB,
        used_by_others_bytes=int(others_gib * GiB),
        compute_capability=(8, 9),
    )


def priced(f: CheckpointFacts, inventory: Inventory, request: Request = REQUEST, **policy: object) -> list[Rung]:
    return vllm.rungs(f, request, inventory, Policy(**policy), installed=True)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ utilization


@pytest.mark.parametrize(
    ("reserved_gib", "outside_gib", "total_gib", "share"),
    [
        (12, 0, 24, 0.5),  # half the card
        (9, 1, 16, 0.5),  # the context and graphs sit outside vLLM's share
        (20, 0, 80, 0.25),  # a card where another model holds 50 GiB: still a fraction of the TOTAL, not of free
        (10, 0, 30, 0.3333),  # rounded down: vLLM never takes more than reserved
        (24, 0, 24, 1.0),
    ],
)
def test_the_utilization_is_vllms_share_of_the_total(
    reserved_gib: float, outside_gib: float, total_gib: float, share: float
) -> None:
    got = vllm.utilization(int(reserved_gib * GiB), int(outside_gib * GiB), int(total_gib * GiB))
    assert got == share
    assert got * total_gib * GiB + outside_gib * GiB <= reserved_gib * GiB  # its share plus the rest: the reservation


@pytest.mark.parametrize(
    ("reserved", "outside", "total"), [(GiB, 2 * GiB, 24 * GiB), (30 * GiB, 0, 24 * GiB), (GiB, 0, 0)]
)
def test_a_share_that_means_nothing_is_an_error(reserved: int, outside: int, total: int) -> None:
    with pytest.raises(RunnerFailed):
        vllm.utilization(reserved, outside, total)


# ------------------------------------------------------------------------------------------------ rungs


def test_an_8b_model_in_bf16_on_a_24_gib_card_is_priced_term_by_term() -> None:
    f = facts(LLAMA3_8B)
    full, four = priced(f, host(card()))
    assert (full.name, full.runner, full.fits, full.quantization, full.dtype) == (
        "vllm",
        "vllm",
        True,
        "none",
        "bfloat16",
    )
    gpu = full.devices["cuda:0"]
    assert gpu.weights_bytes == f.weights_bytes  # as stored, nothing mapped twice on a GPU
    assert gpu.kv_cache_bytes == 131072 * 4096 * 4 == 2 * GiB  # 128 KiB per token × context × sequences
    forward = 2048 * (4 * 4096 + 2 * 14336 + (32 + 2 * 8) * 128) * 2
    assert gpu.activation_bytes == forward + 4 * 128256 * 4 * vllm.SAMPLER_COPIES + vllm.NON_TORCH_BYTES
    assert gpu.runtime_bytes == vllm.CUDA_CONTEXT_BYTES + vllm.CUDA_GRAPH_BASE_BYTES + 32 * vllm.CUDA_GRAPH_LAYER_BYTES
    assert full.devices["cpu"].total_bytes == vllm.HOST_RUNTIME_BYTES  # the API server and engine core
    assert four.fits and four.devices["cuda:0"].weights_bytes < gpu.weights_bytes / 2.5


@pytest.mark.parametrize(
    ("device", "request_", "fits"),
    [
        (card(total_gib=24), REQUEST, ["vllm", "vllm-4bit"]),
        (card(total_gib=24, budget_gib=12), REQUEST, ["vllm-4bit"]),  # the 12 GiB budget: 4-bit
        (card(total_gib=24, others_gib=10), REQUEST, ["vllm-4bit"]),  # another model holds 10 GiB of the card
        (card(total_gib=24, others_gib=18), REQUEST, []),
        (card(total_gib=80), replace(REQUEST, quantization="4bit"), ["vllm-4bit"]),
        (card(total_gib=80), replace(REQUEST, quantization="none"), ["vllm"]),
        (card(total_gib=80), replace(REQUEST, quantization="int8"), []),  # vLLM has no int8 on the fly
    ],
)
def test_which_vllm_rungs_fit(device: Device, request_: Request, fits: list[str]) -> None:
    assert [r.name for r in priced(facts(LLAMA3_8B), host(device), request_) if r.fits] == fits


@pytest.mark.parametrize(
    ("inventory", "installed", "policy", "extra", "blocked"),
    [
        (host(), True, {}, {}, "vLLM needs a CUDA GPU"),
        (host(card()), False, {}, {}, "vLLM is not installed (pip install 'memserve[vllm]' on a CUDA machine)"),
        (host(card()), True, {"allow_gpu": False}, {}, "GPUs are not allowed by policy"),
        (host(card()), True, {"skip_rungs": frozenset({"vllm"})}, {}, "used more memory than planned"),
    ],
)
def test_why_a_vllm_rung_is_not_available(
    inventory: Inventory, installed: bool, policy: dict, extra: dict, blocked: str
) -> None:
    rung = vllm.rungs(facts(LLAMA3_8B, **extra), REQUEST, inventory, Policy(**policy), installed=installed)[0]
    assert not rung.fits and not rung.available and rung.blocked is not None and blocked in rung.blocked


def test_a_pre_quantized_checkpoint_is_served_as_stored_and_never_quantized_again() -> None:
    f = facts(LLAMA3_8B, quantization_config={"quant_method": "awq", "bits": 4})
    stored, four = priced(f, host(card()))
    assert stored.available and stored.dtype == "float16" and stored.devices["cuda:0"].weights_bytes == f.weights_bytes
    assert not four.available and four.blocked == "the checkpoint is already quantized"


def test_two_gpus_split_the_weights_and_the_kv_cache_by_tensor_parallelism() -> None:
    one = priced(facts(LLAMA3_8B), host(card(0)))[0].devices["cuda:0"]
    two = priced(facts(LLAMA3_8B), host(card(0), card(1)))[0]
    assert set(two.devices) == {"cuda:0", "cuda:1", "cpu"}
    for gpu in ("cuda:0", "cuda:1"):
        need = two.devices[gpu]
        assert need.weights_bytes == -(-one.weights_bytes // 2) and need.kv_cache_bytes == one.kv_cache_bytes // 2


# ---------------------------------------------------------------------------------------------- arguments


def launch(rung: Rung, *, reserved: dict[str, int] | None = None, source: str = "/models/m") -> PlanFile:
    return PlanFile(source, vllm.plan_for(rung, REQUEST), reserved_bytes=reserved)


def test_the_argv_of_a_plan() -> None:
    rung = priced(facts(LLAMA3_8B), host(card(total_gib=24, others_gib=10)))[1]  # 4-bit, beside another model
    argv = vllm.arguments(
        "llama", launch(rung), host="127.0.0.1", port=8123, total_bytes={"cuda:0": 24 * GiB}, environ=FAKE
    )
    gpu = rung.devices["cuda:0"]
    share = vllm.utilization(gpu.total_bytes, gpu.runtime_bytes, 24 * GiB)
    assert argv == [
        "/opt/vllm/bin/vllm", "serve", "/models/m",
        "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "llama",
        "--gpu-memory-utilization", f"{share:.4f}",
        "--max-model-len", "4096", "--max-num-seqs", "4", "--max-num-batched-tokens", "2048",
        "--dtype", "bfloat16", "--quantization", "bitsandbytes",
    ]  # fmt: skip
    # vLLM's start-up check: its share must be free on the card after its own CUDA context
    assert share * 24 * GiB + vllm.CUDA_CONTEXT_BYTES <= card(total_gib=24, others_gib=10).free_bytes


@pytest.mark.parametrize(
    ("reserved", "adapters", "gpus", "expect", "absent"),
    [
        ({"cuda:0": 20 * GiB}, {}, 1, ["--gpu-memory-utilization", "0.2"], ["--enable-lora"]),  # calibrated: more KV
        (None, {"sql": "/a/sql", "chat": "/a/chat"}, 1,
         ["--enable-lora", "--max-loras", "2", "--lora-modules", "sql=/a/sql", "chat=/a/chat"], []),
        (None, {}, 2, ["--tensor-parallel-size", "2"], ["--quantization"]),
    ],
)  # fmt: skip
def test_argv_options(
    reserved: dict[str, int] | None, adapters: dict[str, str], gpus: int, expect: list[str], absent: list[str]
) -> None:
    inventory = host(*(card(i, total_gib=80) for i in range(gpus)))
    rung = priced(facts(LLAMA3_8B), inventory)[0]
    totals = {f"cuda:{i}": 80 * GiB for i in range(gpus)}
    if reserved is not None:
        reserved = {"cuda:0": reserved["cuda:0"] + rung.devices["cuda:0"].runtime_bytes}
    argv = vllm.arguments(
        "m",
        launch(rung, reserved=reserved),
        host="127.0.0.1",
        port=1,
        total_bytes=totals,
        adapters=adapters,
        environ=FAKE,
    )
    joined = " ".join(argv)
    assert " ".join(expect) in joined and not any(flag in argv for flag in absent)


def test_a_pre_quantized_checkpoint_names_its_method(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "awq", "bits": 4}}')
    rung = priced(facts(LLAMA3_8B, quantization_config={"quant_method": "awq"}), host(card()))[0]
    argv = vllm.arguments(
        "m", launch(rung, source=str(tmp_path)), host="h", port=1, total_bytes={"cuda:0": 24 * GiB}, environ=FAKE
    )
    assert argv[argv.index("--quantization") + 1] == "awq" and argv[argv.index("--dtype") + 1] == "float16"


def test_every_argv_parses_as_vllm_parses_it() -> None:
    """The stand-in parses vLLM's flag names and rejects unknown ones, as vLLM does."""
    for gpus in (1, 2):
        inventory = host(*(card(i, total_gib=80) for i in range(gpus)))
        for rung in priced(facts(QWEN2_05B), inventory):
            argv = vllm.arguments(
                "m", launch(rung), host="127.0.0.1", port=9, total_bytes={f"cuda:{i}": 80 * GiB for i in range(gpus)},
                adapters={"a": "/a"}, environ=FAKE,
            )  # fmt: skip
            args = parser().parse_args(argv[1:])
            assert args.served_model_name == ["m"] and 0 < args.gpu_memory_utilization <= 1
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "m", "--host", "h", "--port", "1", "--served-model-name", "m", "--no-such"])


@pytest.mark.parametrize(
    ("environ", "totals", "message"),
    [
        ({"PATH": "/nonexistent"}, {"cuda:0": 24 * GiB}, "pip install 'memserve[vllm]' on a CUDA machine"),
        (FAKE, {}, "the total of cuda:0 is unknown"),
    ],
)
def test_argv_errors_say_what_to_do(
    environ: dict[str, str], totals: dict[str, int], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    rung = priced(facts(LLAMA3_8B), host(card()))[0]
    with pytest.raises(RunnerFailed, match=message.replace("[", r"\[").replace("]", r"\]")):
        vllm.arguments("m", launch(rung), host="h", port=1, total_bytes=totals, environ=environ)


def test_a_cpu_plan_is_not_a_vllm_plan() -> None:
    rung = priced(facts(LLAMA3_8B), host(card()))[0]
    cpu_only = replace(vllm.plan_for(rung, REQUEST), devices={"cpu": rung.devices["cpu"]})
    with pytest.raises(RunnerFailed, match="vLLM needs a CUDA GPU"):
        vllm.arguments("m", PlanFile("/m", cpu_only), host="h", port=1, total_bytes={}, environ=FAKE)
