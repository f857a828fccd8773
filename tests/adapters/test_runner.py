"""A real runner process with LoRA adapters on the tiny fp32 demo model: greedy tokens through each adapter equal
PEFT's model, base requests in the same batches are unchanged, adapters come and go without a reload, bad
adapters are refused while the runner keeps serving, and the memory stays within the plan that prices them."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.checkpoint.facts import read_adapter_facts
from tests.adapters.conftest import peft_greedy
from tests.serving import runner_process

PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42], [100, 200, 300, 400, 500, 600, 700, 800, 900], [17, 3]]
MAX_NEW = 16
WATCHDOG_TOLERANCE = 0.10  # the pool's default: a runner may go this far past its reservation


def _decode(model_dir: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return str(AutoTokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True))


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> dict[str, list[str]]:
    """Each model's greedy text per prompt: the base's own ``generate``, and each adapter's loaded by PEFT."""
    models: dict[str, Path | None] = {"tiny": None, **adapter_dirs}
    return {
        name: [_decode(tiny_model_dir, ids) for ids in peft_greedy(tiny_model_dir, adapter, PROMPTS, MAX_NEW)]
        for name, adapter in models.items()
    }


@pytest.fixture(scope="module")
def runner(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """The base with all four adapters from its plan file; yields its URL and its folder (plan, log)."""
    folder = tmp_path_factory.mktemp("runner")
    with runner_process(
        tiny_model_dir,
        folder,
        name="tiny",
        context=512,
        concurrency=8,
        env={"OMP_NUM_THREADS": "1"},
        adapters=tuple(adapter_dirs.values()),
    ) as base:
        yield base, folder


async def _complete(client: httpx.AsyncClient, base: str, model: str, prompt: list[int], stream: bool) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "stream": stream}
    if not stream:
        response = await client.post(f"{base}/v1/completions", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == model  # named as the request named it
        return str(answer["choices"][0]["text"])
    parts = []
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(parts)


def _concurrently(base: str, requests: list[tuple[str, list[int], bool]]) -> list[str]:
    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(_complete(client, base, *r) for r in requests))

    return asyncio.run(run())


def _stats(base: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base}/stats").json())


def test_concurrent_adapters_and_base_equal_each_peft_model(
    runner: tuple[str, Path], expected: dict[str, list[str]]
) -> None:
    """16 requests at once over the base and its four adapters, by every way of naming them, streamed and not:
    each answer is its own model's greedy text (sequences of different adapters share every forward)."""
    base, _ = runner
    names = {"tiny": "tiny", "ad1": "ad1", "tiny:ad2": "ad2", "ad3": "ad3", "tiny:ad4": "ad4"}
    requests = [(model, i % len(PROMPTS)) for i, model in enumerate(list(names) * 4)][:16]
    before = _stats(base)["requests_total"]
    answers = _concurrently(base, [(model, PROMPTS[p], i % 2 == 0) for i, (model, p) in enumerate(requests)])
    assert answers == [expected[names[model]][p] for model, p in requests]
    assert _stats(base)["requests_total"] - before == 16
    assert len({expected[m][0] for m in expected}) == 5  # every adapter changes the answer


def test_models_lists_each_adapter_with_the_base_as_parent(
    runner: tuple[str, Path], adapter_dirs: dict[str, Path]
) -> None:
    base, folder = runner
    models = httpx.get(f"{base}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [
        ("tiny", None),
        ("ad1", "tiny"),
        ("ad2", "tiny"),
        ("ad3", "tiny"),
        ("ad4", "tiny"),
    ]
    assert {m["id"]: m["root"] for m in models[1:]} == {name: str(path) for name, path in adapter_dirs.items()}
    ready = [json.loads(line) for line in (folder / "runner.log").read_text().splitlines() if '"ready"' in line]
    assert ready[0]["adapters"] == ["ad1", "ad2", "ad3", "ad4"]
    health = httpx.get(f"{base}/health").json()
    assert [a["name"] for a in health["adapters"]] == ["ad1", "ad2", "ad3", "ad4"]


def test_base_with_four_adapters_stays_within_the_plan_that_prices_them(
    runner: tuple[str, Path], adapter_dirs: dict[str, Path], expected: dict[str, list[str]]
) -> None:
    """The plan (``fit --adapter`` ×4) counts the adapters' header bytes once each, on one copy of the base; the
    runner's measured peak after its worst-case warm-up and after traffic on every adapter stays within it."""
    base, folder = runner
    plan = json.loads((folder / "plan.json").read_text())
    header_bytes = sum(read_adapter_facts(p).weights_bytes for p in adapter_dirs.values())
    assert sum(a["weights_bytes"] for a in plan["model"]["adapters"]) == header_bytes
    health = httpx.get(f"{base}/health").json()
    assert sum(a["weights_bytes"] for a in health["adapters"]) == header_bytes  # fp32: held as stored
    _concurrently(base, [(name, PROMPTS[0], False) for name in ("tiny", *adapter_dirs)])
    health = httpx.get(f"{base}/health").json()
    reserved = health["load"]["plan_check"]["reserved_bytes"]["cpu"]
    peak = health["memory"]["cpu"]["peak_rss_bytes"]
    assert health["load"]["plan_check"]["fits"], health["load"]["plan_check"]
    assert peak <= reserved * (1 + WATCHDOG_TOLERANCE), (peak, reserved)


def test_adapters_are_added_and_removed_without_a_reload(
    runner: tuple[str, Path], adapter_dirs: dict[str, Path], expected: dict[str, list[str]], tmp_path: Path
) -> None:
    base, _ = runner
    uptime = httpx.get(f"{base}/health").json()["load"]
    added = httpx.post(f"{base}/adapters", json={"name": "again", "source": str(adapter_dirs["ad1"])})
    assert added.status_code == 200, added.text
    assert added.json()["id"] == "again" and added.json()["parent"] == "tiny"
    assert _concurrently(base, [("again", PROMPTS[1], False), ("tiny:again", PROMPTS[2], True)]) == [
        expected["ad1"][1],
        expected["ad1"][2],
    ]
    removed = httpx.delete(f"{base}/adapters/again")
    assert removed.status_code == 200 and removed.json() == {
        "id": "again",
        "object": "model",
        "parent": "tiny",
        "deleted": True,
    }
    gone = httpx.post(f"{base}/v1/completions", json={"model": "again", "prompt": [5], "max_tokens": 2})
    assert gone.status_code == 404 and "not 'again'" in gone.json()["error"]["message"]
    assert "again" not in [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    assert httpx.get(f"{base}/health").json()["load"] == uptime  # the same load: nothing was reloaded
    assert _concurrently(base, [("ad1", PROMPTS[0], False)]) == [expected["ad1"][0]]  # the others unchanged


def test_bad_adapters_are_refused_and_the_runner_keeps_serving(
    runner: tuple[str, Path], adapter_dirs: dict[str, Path], expected: dict[str, list[str]], tmp_path: Path
) -> None:
    base, _ = runner
    no_weights = tmp_path / "no-weights"
    shutil.copytree(adapter_dirs["ad1"], no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    bad_rank = tmp_path / "bad-rank"
    shutil.copytree(adapter_dirs["ad1"], bad_rank)
    config = json.loads((bad_rank / "adapter_config.json").read_text())
    (bad_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"name": "x", "source": str(no_weights)}, 400, "has no adapter_model.safetensors"),
        ({"name": "x", "source": str(bad_rank)}, 400, "rank 8 in its weights but rank 2"),
        ({"name": "x", "source": str(tmp_path / "nothing")}, 404, "is not a folder"),
        ({"name": "ad1", "source": str(adapter_dirs["ad2"])}, 400, "ad1 is already loaded"),
        ({"name": "tiny", "source": str(adapter_dirs["ad2"])}, 400, "the base model's own name"),
        ({"name": "a:b", "source": str(adapter_dirs["ad2"])}, 400, "name"),
        ({"name": "x"}, 400, "source"),
    ]
    for body, status, words in cases:
        response = httpx.post(f"{base}/adapters", json=body)
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error"]["message"], (body, response.text)
    missing = httpx.delete(f"{base}/adapters/nothing")
    assert missing.status_code == 404 and "no adapter named nothing" in missing.json()["error"]["message"]
    assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["tiny", "ad1", "ad2", "ad3", "ad4"]
    assert _concurrently(base, [("ad2", PROMPTS[0], False), ("tiny", PROMPTS[0], True)]) == [
        expected["ad2"][0],
        expected["tiny"][0],
    ]


def test_generate_engine_serves_adapters_row_by_row(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], expected: dict[str, list[str]], tmp_path: Path
) -> None:
    """The ``generate`` engine batches the rows of different adapters into one call, each row on its adapter."""
    with runner_process(
        tiny_model_dir,
        tmp_path,
        name="tiny",
        context=256,
        concurrency=4,
        env={"OMP_NUM_THREADS": "1", "MEMSERVE_ENGINE": "generate"},
        adapters=(adapter_dirs["ad1"], adapter_dirs["ad3"]),
    ) as base:
        assert httpx.get(f"{base}/health").json()["engine"] == "generate"
        requests = [("ad1", 0), ("tiny", 0), ("ad3", 0), ("tiny:ad1", 3)]
        answers = _concurrently(base, [(m, PROMPTS[p], False) for m, p in requests])
        names = {"tiny:ad1": "ad1"}
        assert answers == [expected[names.get(m, m)][p] for m, p in requests]
