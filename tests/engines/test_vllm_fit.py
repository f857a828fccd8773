"""Which engines ``memserve fit`` considers and why, vLLM's rungs in the ladder (``with_vllm``), and a missing
engine asked for by name refused before anything is read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from memserve.cli import main
from memserve.engines import engines_for, is_installed, require
from memserve.engines.vllm import with_vllm
from memserve.errors import InvalidArgument
from memserve.memory.planner import Policy, plan
from tests.engines.conftest import FAKE_VLLM
from tests.engines.test_vllm_args import REQUEST, card, facts, host
from tests.fakes import LLAMA3_8B, GiB

NOTHING = {"PATH": "/nonexistent"}
STAND_IN = {"PATH": "/nonexistent", "MEMSERVE_VLLM_COMMAND": f"{sys.executable} {FAKE_VLLM}"}


@pytest.mark.parametrize(
    ("environ", "has_gpu", "gguf", "expect"),
    [
        (
            NOTHING,
            True,
            False,
            [
                ("transformers", True, True, "memserve's own runner"),
                ("vllm", False, False, "not installed: pip install 'memserve[vllm]' on a CUDA machine"),
                ("llama.cpp", False, False, "not installed: pip install 'memserve[llamacpp]'"),
            ],
        ),
        (STAND_IN, False, False, [("vllm", True, False, "needs a CUDA GPU")]),
        (STAND_IN, True, False, [("vllm", True, True, "considered")]),
        (STAND_IN, True, True, [("transformers", True, False, "not GGUF"), ("vllm", True, False, "not GGUF")]),
        (
            {"PATH": "/nonexistent", "MEMSERVE_LLAMA_SERVER_COMMAND": "/opt/llama-server -v"},
            False,
            False,
            [("llama.cpp", True, False, "reads GGUF files only")],
        ),
    ],
)
def test_which_engines_are_considered_and_why(
    environ: dict[str, str],
    has_gpu: bool,
    gguf: bool,
    expect: list[tuple[str, bool, bool, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # vLLM's package is never importable here; PATH is the rest
    statuses = {s.name: s for s in engines_for(has_gpu=has_gpu, model_format="safetensors", gguf=gguf, environ=environ)}
    assert list(statuses) == ["transformers", "vllm", "llama.cpp"]
    for name, installed, considered, why in expect:
        status = statuses[name]
        assert (status.installed, status.considered) == (installed, considered) and why in status.why, status


def test_an_engine_command_is_split_like_a_shell() -> None:
    statuses = engines_for(
        has_gpu=False,
        model_format="gguf",
        gguf=True,
        environ={"MEMSERVE_LLAMA_SERVER_COMMAND": "'/opt/my llama/server' -v"},
    )
    assert statuses[2].command == ("/opt/my llama/server", "-v") and statuses[2].considered


def test_a_missing_engine_asked_for_is_refused_with_its_install_command() -> None:
    with pytest.raises(InvalidArgument, match=r"pip install 'memserve\[vllm\]' on a CUDA machine"):
        require("vllm", NOTHING)
    require("vllm", STAND_IN)
    with pytest.raises(InvalidArgument, match="unknown engine 'tgi'"):
        is_installed("tgi")


def test_fit_refuses_a_missing_engine_before_reading_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSERVE_VLLM_COMMAND", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    result = CliRunner().invoke(main, ["fit", "/no/such/model", "--runner", "vllm"])
    assert result.exit_code == 1
    assert "pip install 'memserve[vllm]' on a CUDA machine" in result.output and "/no/such/model" not in result.output


def test_fit_lists_every_engine_in_its_table_and_its_json(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSERVE_VLLM_COMMAND", f"{sys.executable} {FAKE_VLLM}")
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    table = runner.invoke(main, ["fit", str(tiny_model_dir), "--context", "256", "--memory", "cpu=8GiB"])
    assert table.exit_code == 0, table.output
    assert "engines (runner kinds)" in table.output and "needs a CUDA GPU" in table.output
    answer = runner.invoke(main, ["fit", str(tiny_model_dir), "--context", "256", "--memory", "cpu=8GiB", "--json"])
    data = json.loads(answer.output)
    engines = {e["name"]: e for e in data["engines"]}
    assert engines["vllm"]["installed"] and engines["vllm"]["why"] == "needs a CUDA GPU"
    assert data["plan"]["runner"] == "transformers"
    refused = runner.invoke(main, ["fit", str(tiny_model_dir), "--runner", "vllm"])
    assert refused.exit_code == 1 and "has no CUDA GPU" in refused.output


# ------------------------------------------------------------------------------------------- with_vllm


def ladder(inventory_gpus: tuple, runner: str, installed: bool = True) -> tuple[list[str], str | None, str | None]:
    f = facts(LLAMA3_8B)
    inventory = host(*inventory_gpus)
    result = with_vllm(f, REQUEST, inventory, Policy(), plan(f, REQUEST, inventory), runner=runner, installed=installed)
    chosen = result.plan.rung if result.plan else None
    return [r.name for r in result.rungs], chosen, result.nofit.message if result.nofit else None


@pytest.mark.parametrize(
    ("gpus", "runner", "installed", "first", "chosen"),
    [
        ((card(total_gib=24),), "auto", True, "vllm", "vllm"),
        ((card(total_gib=24, budget_gib=12),), "auto", True, "vllm", "vllm-4bit"),  # 7B bf16 under 12 GiB
        ((card(total_gib=24),), "auto", False, "gpu", "gpu"),  # not installed: the ladder as before
        ((), "auto", True, "gpu", "cpu"),  # no GPU: nothing to add
        ((card(total_gib=24),), "transformers", True, "gpu", "gpu"),
        ((card(total_gib=24),), "vllm", True, "vllm", "vllm"),
    ],
)
def test_vllm_rungs_join_the_ladder(gpus: tuple, runner: str, installed: bool, first: str, chosen: str) -> None:
    names, plan_rung, _ = ladder(gpus, runner, installed)
    assert names[0] == first and plan_rung == chosen


def test_vllm_asked_for_where_it_cannot_fit_names_what_would() -> None:
    names, chosen, message = ladder((card(total_gib=24, budget_gib=5),), "vllm")
    assert chosen is None and message is not None
    assert message.startswith("/models/m does not fit on this host; closest is vllm-4bit")
    assert "fits as cpu with runner transformers" in message
    assert "vllm" in names and "gpu" in names


def test_the_vllm_plan_reserves_the_gpu_and_the_host() -> None:
    f = facts(LLAMA3_8B)
    inventory = host(card(total_gib=80))
    result = with_vllm(f, REQUEST, inventory, Policy(), plan(f, REQUEST, inventory), installed=True)
    assert result.plan is not None and result.plan.runner == "vllm"
    assert set(result.plan.reserved_bytes) == {"cuda:0", "cpu"} and result.plan.reserved_bytes["cuda:0"] > 16 * GiB
    assert json.loads(json.dumps(result.to_json()))["plan"]["runner"] == "vllm"


def test_engines_import_neither_the_pool_nor_the_gateway_nor_torch() -> None:
    """engines/ is pure (it may import memory/ and checkpoint/ only); the external runner is gateway-side."""
    code = (
        "import sys, memserve.engines, memserve.engines.vllm; "
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['memserve', 'pool'], ['memserve', 'gateway'], "
        "['memserve', 'runner']) or m in ('torch', 'transformers', 'vllm')]; assert not bad, bad; "
        "import memserve.pool.external; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
