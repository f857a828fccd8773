"""Locating a source: mistyped paths are answered at once and never go to the hub; the hub gets one short try.

Nothing here reaches the network: the hub's probe and huggingface_hub's lookups are replaced, and a test
that must not look anything up replaces them with functions that fail it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.checkpoint import locate as locate_module
from memserve.checkpoint.locate import check_source, hub_unreachable_reason, locate, looks_like_path, read_facts
from memserve.errors import CheckpointError, HubUnavailable, ModelNotFound


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the hub was asked")


@pytest.fixture(autouse=True)
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working folder with ``models/demo-tiny`` (an empty folder), an empty HF cache, the hub allowed but
    any lookup failing the test, and no remembered probe."""
    (tmp_path / "work" / "models" / "demo-tiny").mkdir(parents=True)
    (tmp_path / "cache").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(locate_module, "_probe_result", None)
    monkeypatch.setattr(locate_module, "hub_unreachable_reason", _never)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", _never)
    monkeypatch.setattr("huggingface_hub.get_safetensors_metadata", _never)
    yield tmp_path / "work"


@pytest.mark.parametrize(
    ("spec", "path_like"),
    [
        ("./models/x", True),
        ("../x/y", True),
        ("/srv/models/x", True),
        ("~/models/x", True),
        ("demo-tiny", True),  # no org/: only a folder can be meant
        ("models/demo-tinyy", True),  # ./models exists here
        ("a/b/c", True),
        ("models/", True),
        ("org\\name", True),
        ("meta-llama/Llama-3.2-1B", False),
        ("org/name@refs/pr/1", False),
        ("modls/demo-tiny", False),
    ],
)
def test_what_looks_like_a_path(spec: str, path_like: bool) -> None:
    assert looks_like_path(spec) is path_like


@pytest.mark.parametrize(
    ("spec", "nearest"),
    [
        ("models/demo-tinyy", "models/demo-tiny"),
        ("./models/demo-tiny2", "models/demo-tiny"),
        ("modelz/demo-tiny/", "models/demo-tiny"),  # the missing part is not the last one
    ],
)
def test_a_mistyped_local_path_is_answered_at_once_with_the_nearest_name(spec: str, nearest: str) -> None:
    with pytest.raises(ModelNotFound) as raised:
        locate(spec)  # the hub is allowed, but any lookup would fail the test
    message = raised.value.message
    assert message.startswith(f"{spec}: no such folder") and f"nearest existing name: {nearest}" in message


def test_no_suggestion_when_nothing_is_close(here: Path) -> None:
    with pytest.raises(ModelNotFound) as raised:
        read_facts(str(here / "models" / "llama-70b"))
    assert f"no such folder (no such file or directory: {here / 'models' / 'llama-70b'})" in raised.value.message
    assert "nearest" not in raised.value.message


def test_a_hub_id_when_the_hub_does_not_answer_is_one_short_try(monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[str] = []

    def probe() -> str:
        tries.append("probe")
        return "ConnectError: no route to host"

    monkeypatch.setattr(locate_module, "hub_unreachable_reason", probe)
    for _ in range(2):
        with pytest.raises(HubUnavailable) as raised:
            read_facts("modls/demo-tiny")
        assert "could not be reached in one try of 3 s (ConnectError: no route to host)" in raised.value.message
        assert "nearest existing name: models/demo-tiny" in raised.value.message  # what it may have meant
    assert tries == ["probe", "probe"]  # and huggingface_hub was never called


def test_the_probe_is_one_request_remembered_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locate_module, "hub_unreachable_reason", hub_unreachable_reason)
    requests: list[str] = []

    def head(url: str, **kwargs: Any) -> httpx.Response:
        requests.append(url)
        raise httpx.ConnectError("no route to host")

    monkeypatch.setattr(httpx, "head", head)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    assert hub_unreachable_reason() == "ConnectError: no route to host"
    assert hub_unreachable_reason() == "ConnectError: no route to host"
    assert requests == ["https://hub.example"]


def test_offline_a_hub_id_is_not_looked_up() -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(HubUnavailable, match="HF_HUB_OFFLINE is set"):
            locate("org/model")


# --- the start-up check of configured sources -------------------------------------------------------------------


def test_start_up_check_reads_local_checkpoints_without_the_network(tiny_model_dir: Path, here: Path) -> None:
    checked = check_source(str(tiny_model_dir))
    assert checked.kind == "dir" and not checked.warning and str(tiny_model_dir) in checked.note
    with pytest.raises(CheckpointError):
        check_source("models/demo-tiny")  # a folder, but not a checkpoint
    with pytest.raises(ModelNotFound, match="nearest existing name: models/demo-tiny"):
        check_source("models/demo-tinyy")


def test_start_up_check_finds_a_cached_snapshot(tiny_model_dir: Path, here: Path) -> None:
    repo = here.parent / "cache" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("0" * 40))
    checked = check_source("org/tiny")
    assert checked.kind == "hf-cache" and not checked.warning


def test_start_up_check_only_reports_a_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    online = check_source("org/model")  # the hub is allowed, but start-up never asks it
    assert online.kind == "hub" and "first use" in online.note and not online.warning
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = check_source("org/model")
    assert offline.warning and "HF_HUB_OFFLINE is set" in offline.note


def test_a_missing_demo_model_says_how_to_make_it() -> None:
    with pytest.raises(ModelNotFound) as raised:
        locate("models/demo-small")
    assert "memserve demo-model models/demo-small --size small" in raised.value.message
