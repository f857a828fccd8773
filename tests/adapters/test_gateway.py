"""Adapters through the real gateway: configured ones served by their base's one runner under their own names,
one added to the loaded base without a reload (its weights reserved), one removed; bad adapters are refused; an
adapter added at run time is served again after a restart, and one removed is not."""

from __future__ import annotations

from pathlib import Path

import httpx

from memserve.checkpoint.facts import read_adapter_facts
from memserve.config import AdapterConfig
from tests.gateway.test_gateway_process import gateway, host, local, ps, settings_for

GiB = 1 << 30
PROMPT = {"prompt": "once upon a time", "max_tokens": 12, "temperature": 0}


def test_adapters_on_one_base_through_the_gateway(
    tmp_path: Path, tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    (first, first_dir), (second, second_dir) = list(adapter_dirs.items())[:2]
    base = local("demo", tiny_model_dir, adapters=[AdapterConfig(name=first, source=str(first_dir))])
    with gateway(settings_for(tmp_path, [base]), host(8 * GiB)) as (origin, _):

        def text(model: str) -> str:
            answer = httpx.post(f"{origin}/v1/completions", json={**PROMPT, "model": model}, timeout=120)
            assert answer.status_code == 200, answer.text
            return str(answer.json()["choices"][0]["text"])

        plain, adapted = text("demo"), text(first)
        assert text(f"demo:{first}") == adapted and adapted != plain  # the adapter changes the greedy answer
        listed = {m["id"]: m.get("parent") for m in httpx.get(f"{origin}/v1/models").json()["data"]}
        assert listed == {"demo": None, first: "demo"}
        assert httpx.get(f"{origin}/v1/models/{first}").json()["parent"] == "demo"  # retrieve, as listed
        [row] = ps(origin)["models"]
        assert row["adapters"] == [first]
        before = row["devices"]["cpu"]["reserved_bytes"]

        added = httpx.post(
            f"{origin}/api/adapters", json={"model": "demo", "name": second, "source": str(second_dir)}, timeout=120
        )
        assert added.status_code == 200, added.text
        [row] = ps(origin)["models"]
        assert row["pid"] == added.json()["model"]["pid"] and row["adapters"] == sorted([first, second])  # no reload
        weights = read_adapter_facts(second_dir).weights_bytes
        assert row["devices"]["cpu"]["reserved_bytes"] == before + weights
        second_text = text(second)
        assert second_text not in (plain, adapted)

        taken = httpx.post(f"{origin}/api/adapters", json={"model": "demo", "name": first, "source": str(second_dir)})
        not_adapter = httpx.post(
            f"{origin}/api/adapters", json={"model": "demo", "name": "x", "source": str(tiny_model_dir)}
        )
        assert (taken.status_code, not_adapter.status_code) == (409, 400), (taken.text, not_adapter.text)

        removed = httpx.delete(f"{origin}/api/adapters/{second}", timeout=60)
        assert removed.status_code == 200, removed.text
        gone = httpx.post(f"{origin}/v1/completions", json={**PROMPT, "model": second}, timeout=60)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert text(first) == adapted and ps(origin)["models"][0]["pid"] == row["pid"]

        restored = httpx.post(
            f"{origin}/api/adapters", json={"model": "demo", "name": second, "source": str(second_dir)}, timeout=120
        )
        assert restored.status_code == 200, restored.text

    # a restart on the same data folder serves the adapter added at run time again (the store kept it)
    with gateway(settings_for(tmp_path, [base]), host(8 * GiB)) as (origin, _):
        listed = {m["id"]: m.get("parent") for m in httpx.get(f"{origin}/v1/models").json()["data"]}
        assert listed == {"demo": None, first: "demo", second: "demo"}
        answer = httpx.post(f"{origin}/v1/completions", json={**PROMPT, "model": second}, timeout=120)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == second_text
        assert sorted(ps(origin)["models"][0]["adapters"]) == sorted([first, second])  # loaded with its base
        assert httpx.delete(f"{origin}/api/adapters/{second}", timeout=60).status_code == 200

    # removed at run time: a restart does not bring it back
    with gateway(settings_for(tmp_path, [base]), host(8 * GiB)) as (origin, _):
        listed = {m["id"]: m.get("parent") for m in httpx.get(f"{origin}/v1/models").json()["data"]}
        assert listed == {"demo": None, first: "demo"}


def test_an_adapter_for_another_base_is_refused_while_its_base_is_stopped(
    tmp_path: Path, tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """Before, it was stored and listed, and every load of the base then failed on it (a 502 for the base and each
    of its adapters, after a restart too); now the add is refused from the headers, as on a loaded base."""
    from tests.adapters.test_lora import _other_base

    other = _other_base(tmp_path)
    with gateway(settings_for(tmp_path, [local("demo", tiny_model_dir)]), host(8 * GiB)) as (origin, _):
        refused = httpx.post(f"{origin}/api/adapters", json={"model": "demo", "name": "x", "source": str(other)})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "adapter_base_mismatch", refused.text
        assert not ps(origin)["models"], "the check loaded the base"
        assert "x" not in {m["id"] for m in httpx.get(f"{origin}/v1/models").json()["data"]}
        (name, folder), *_ = adapter_dirs.items()
        added = httpx.post(f"{origin}/api/adapters", json={"model": "demo", "name": name, "source": str(folder)})
        assert added.status_code == 200, added.text  # its own base's adapter: taken while stopped, as before
        answer = httpx.post(f"{origin}/v1/completions", json={**PROMPT, "model": name}, timeout=120)
        assert answer.status_code == 200, answer.text
