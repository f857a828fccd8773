"""The ledger's arithmetic and the calibration file: plain data, a temp dir, no processes."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from memserve.errors import InvalidArgument
from memserve.memory.estimate import DeviceNeed
from memserve.memory.planner import Plan
from memserve.pool.eviction import choose_evictions
from memserve.pool.ledger import (
    Calibration,
    Ledger,
    calibrated,
    checkpoint_files,
    checkpoint_fingerprint,
    plan_key,
)

GiB = 1024**3


def ledger() -> Ledger:
    """16 GiB RAM with 1 GiB headroom, a 24 GiB GPU with 2 GiB headroom."""
    return Ledger({"cpu": 16 * GiB, "cuda:0": 24 * GiB}, {"cpu": GiB, "cuda:0": 2 * GiB})


# ------------------------------------------------------------------------------------- held


@pytest.mark.parametrize(
    ("reserved", "measured", "held"),
    [
        ({"cpu": 4 * GiB}, None, {"cpu": 4 * GiB}),
        ({"cpu": 4 * GiB}, {"cpu": 3 * GiB}, {"cpu": 4 * GiB}),  # under the plan: the peak may still come
        ({"cpu": 4 * GiB}, {"cpu": 5 * GiB}, {"cpu": 5 * GiB}),  # over the plan: counted at its real size
        ({"cpu": GiB, "cuda:0": 8 * GiB}, {"cpu": 2 * GiB, "cuda:0": 7 * GiB}, {"cpu": 2 * GiB, "cuda:0": 8 * GiB}),
        ({"cuda:0": 8 * GiB}, {"cpu": GiB, "cuda:0": 8 * GiB}, {"cpu": GiB, "cuda:0": 8 * GiB}),  # unplanned cpu
    ],
    ids=["reserved only", "measured below", "measured above", "per device", "measured on an unplanned device"],
)
def test_held_is_the_larger_of_reserved_and_measured_per_device(
    reserved: dict[str, int], measured: dict[str, int] | None, held: dict[str, int]
) -> None:
    book = ledger()
    book.reserve("m", reserved)
    if measured is not None:
        book.measure("m", measured)
    assert book.held("m") == held
    assert book.free_bytes() == {dev: book.usable_bytes()[dev] - held.get(dev, 0) for dev in ("cpu", "cuda:0")}


def test_a_new_sample_replaces_the_previous_one() -> None:
    book = ledger()
    book.reserve("m", {"cpu": 2 * GiB})
    book.measure("m", {"cpu": 6 * GiB, "cuda:0": GiB})
    book.measure("m", {"cpu": 3 * GiB})
    assert book.held("m") == {"cpu": 3 * GiB}  # cuda:0 was in the old sample only


def test_a_new_reservation_forgets_the_previous_runners_samples() -> None:
    book = ledger()
    book.reserve("m", {"cpu": 2 * GiB})
    book.measure("m", {"cpu": 6 * GiB})
    book.reserve("m", {"cpu": GiB})  # retried one rung lower
    assert book.held("m") == {"cpu": GiB}


def test_a_sample_after_release_does_not_bring_the_bytes_back() -> None:
    book = ledger()
    book.reserve("m", {"cpu": 2 * GiB})
    book.release("m")
    book.measure("m", {"cpu": 6 * GiB})
    assert book.held("m") == {}
    assert book.names() == []
    assert book.free_bytes()["cpu"] == 15 * GiB


# ---------------------------------------------------------------------------- free and fits


def fits_now(book: Ledger, need: dict[str, int]) -> bool:
    """Whether ``need`` fits what the ledger has free now, as the pool's admission asks it (no eviction)."""
    return choose_evictions(need, book.free_bytes(), []) == []


def test_free_never_hands_out_headroom() -> None:
    book = ledger()
    assert book.usable_bytes() == {"cpu": 15 * GiB, "cuda:0": 22 * GiB}
    assert book.free_bytes() == {"cpu": 15 * GiB, "cuda:0": 22 * GiB}
    assert not fits_now(book, {"cpu": 16 * GiB})  # the whole capacity is there, but 1 GiB of it is headroom
    book.reserve("m", {"cpu": 15 * GiB})
    assert book.free_bytes()["cpu"] == 0
    assert not fits_now(book, {"cpu": 1})


def test_headroom_star_applies_to_devices_without_their_own() -> None:
    book = Ledger({"cpu": 16 * GiB, "cuda:0": 24 * GiB}, {"*": GiB, "cuda:0": 3 * GiB})
    assert book.usable_bytes() == {"cpu": 15 * GiB, "cuda:0": 21 * GiB}


def test_headroom_larger_than_capacity_leaves_nothing_usable() -> None:
    assert Ledger({"cpu": GiB}, {"cpu": 2 * GiB}).usable_bytes() == {"cpu": 0}


def test_free_is_clamped_at_zero_when_a_runner_outgrows_its_plan() -> None:
    book = ledger()
    book.reserve("m", {"cpu": 10 * GiB})
    book.measure("m", {"cpu": 17 * GiB})
    assert book.free_bytes()["cpu"] == 0
    assert book.to_json()["devices"]["cpu"]["held_bytes"] == 17 * GiB  # the overshoot stays visible


@pytest.mark.parametrize(
    ("need", "fits"),
    [
        ({}, True),
        ({"cpu": 11 * GiB}, True),  # exactly what is free
        ({"cpu": 11 * GiB + 1}, False),  # one byte past it
        ({"cpu": 11 * GiB, "cuda:0": 14 * GiB}, True),
        ({"cpu": 11 * GiB, "cuda:0": 14 * GiB + 1}, False),  # fits one device but not the other
        ({"cuda:1": 0, "cpu": GiB}, True),  # nothing needed on an unknown device
        ({"cuda:1": 1}, False),  # an unknown device has nothing free
    ],
)
def test_fits_at_the_exact_boundary(need: dict[str, int], fits: bool) -> None:
    book = ledger()
    book.reserve("a", {"cpu": 4 * GiB, "cuda:0": 8 * GiB})
    assert book.free_bytes() == {"cpu": 11 * GiB, "cuda:0": 14 * GiB}
    assert fits_now(book, need) is fits


def test_release_frees_and_is_harmless_twice() -> None:
    book = ledger()
    book.reserve("a", {"cpu": 4 * GiB})
    book.reserve("b", {"cpu": 6 * GiB, "cuda:0": 20 * GiB})
    assert book.free_bytes() == {"cpu": 5 * GiB, "cuda:0": 2 * GiB}
    book.release("b")
    assert book.free_bytes() == {"cpu": 11 * GiB, "cuda:0": 22 * GiB}
    book.release("b")
    assert book.names() == ["a"]
    assert book.held("b") == {}


def test_bytes_on_a_device_without_capacity_are_counted_and_block_it() -> None:
    book = Ledger({"cpu": 16 * GiB}, {})
    book.reserve("m", {"cpu": GiB, "cuda:0": GiB})
    assert book.free_bytes() == {"cpu": 15 * GiB, "cuda:0": 0}
    assert book.to_json()["devices"]["cuda:0"]["capacity_bytes"] == 0


@pytest.mark.parametrize(
    ("capacity", "headroom", "match"),
    [
        ({"cpu": -1}, {}, "capacity for cpu"),
        ({"cpu": GiB}, {"cpu": 1.5}, "headroom for cpu"),
        ({"cpu": GiB}, {"cuda:0": GiB}, "headroom given for cuda:0, which has no capacity"),
    ],
)
def test_bad_sizes_are_refused_with_a_message(capacity: dict, headroom: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        Ledger(capacity, headroom)


def test_negative_reservation_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="reserved bytes of m for cpu"):
        ledger().reserve("m", {"cpu": -5})


def test_to_json_shape() -> None:
    book = ledger()
    book.reserve("b", {"cpu": GiB, "cuda:0": 8 * GiB})
    book.measure("b", {"cpu": 2 * GiB, "cuda:0": 7 * GiB})
    book.reserve("a", {"cpu": 3 * GiB})
    assert book.to_json() == {
        "devices": {
            "cpu": {
                "capacity_bytes": 16 * GiB,
                "headroom_bytes": GiB,
                "usable_bytes": 15 * GiB,
                "held_bytes": 5 * GiB,
                "free_bytes": 10 * GiB,
            },
            "cuda:0": {
                "capacity_bytes": 24 * GiB,
                "headroom_bytes": 2 * GiB,
                "usable_bytes": 22 * GiB,
                "held_bytes": 8 * GiB,
                "free_bytes": 14 * GiB,
            },
        },
        "models": {
            "a": {"cpu": {"reserved_bytes": 3 * GiB, "measured_bytes": None, "held_bytes": 3 * GiB}},
            "b": {
                "cpu": {"reserved_bytes": GiB, "measured_bytes": 2 * GiB, "held_bytes": 2 * GiB},
                "cuda:0": {"reserved_bytes": 8 * GiB, "measured_bytes": 7 * GiB, "held_bytes": 8 * GiB},
            },
        },
    }
    assert json.loads(json.dumps(book.to_json())) == book.to_json()


# ------------------------------------------------------------------------------ calibration


def test_calibration_round_trip_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "data" / "nested" / "calibration.json"  # parents do not exist yet
    first = Calibration(path)
    assert first.get("fp", "plan") is None
    first.put("fp", "plan", {"cpu": 3 * GiB, "cuda:0": 7 * GiB})
    first.put("fp", "other-plan", {"cpu": GiB})
    first.put("fp2", "plan", {"cpu": 2 * GiB})
    second = Calibration(path)
    assert second.get("fp", "plan") == {"cpu": 3 * GiB, "cuda:0": 7 * GiB}
    assert second.get("fp", "other-plan") == {"cpu": GiB}
    assert second.get("fp2", "plan") == {"cpu": 2 * GiB}
    assert second.get("fp2", "other-plan") is None
    second.put("fp", "plan", {"cpu": 4 * GiB})  # a higher measurement raises the mark on its device
    assert Calibration(path).get("fp", "plan") == {"cpu": 4 * GiB, "cuda:0": 7 * GiB}


def test_a_peak_is_a_high_water_mark_per_device(tmp_path: Path) -> None:
    """A later warm-up that stays below what traffic once reached must not lower the reservation again."""
    path = tmp_path / "calibration.json"
    calibration = Calibration(path)
    calibration.put("fp", "plan", {"cpu": 3 * GiB, "cuda:0": 7 * GiB})
    written = path.stat().st_mtime_ns, path.read_bytes()
    calibration.put("fp", "plan", {"cpu": 2 * GiB})  # smaller, and cuda:0 not measured this time
    assert calibration.get("fp", "plan") == {"cpu": 3 * GiB, "cuda:0": 7 * GiB}
    assert (path.stat().st_mtime_ns, path.read_bytes()) == written  # nothing new: not rewritten
    calibration.put("fp", "plan", {"cpu": 2 * GiB, "cuda:0": 8 * GiB})
    assert Calibration(path).get("fp", "plan") == {"cpu": 3 * GiB, "cuda:0": 8 * GiB}


def test_get_returns_a_copy(tmp_path: Path) -> None:
    calibration = Calibration(tmp_path / "calibration.json")
    calibration.put("fp", "plan", {"cpu": GiB})
    calibration.get("fp", "plan")["cpu"] = 0  # type: ignore[index]
    assert calibration.get("fp", "plan") == {"cpu": GiB}


def test_put_writes_atomically_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "calibration.json"
    Calibration(path).put("fp", "plan", {"cpu": GiB})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json"]
    before = path.read_bytes()

    def fail_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    calibration = Calibration(path)
    calibration.put("fp", "plan", {"cpu": 9 * GiB})
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json"]  # and the temp file is gone
    assert calibration.get("fp", "plan") == {"cpu": 9 * GiB}  # kept in memory for this run


def test_a_failed_write_is_a_warning_not_a_crash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    calibration = Calibration(blocker / "calibration.json")
    with caplog.at_level(logging.WARNING, logger="memserve.pool.ledger"):
        calibration.put("fp", "plan", {"cpu": GiB})
    assert "could not save memory calibration" in caplog.text
    assert calibration.get("fp", "plan") == {"cpu": GiB}


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe binary",
        b"[]",
        b'{"version": 1, "peaks": []}',
        b'{"version": 1, "peaks": {"fp": {"plan": {"cpu": -1}}}}',
        b'{"version": 1, "peaks": {"fp": {"plan": {"cpu": "1GiB"}}}}',
        b'{"version": 99, "peaks": {}}',
        b"",
    ],
    ids=["truncated", "binary", "a list", "peaks a list", "negative", "a string size", "unknown version", "empty"],
)
def test_a_corrupt_file_is_treated_as_empty_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "calibration.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="memserve.pool.ledger"):
        calibration = Calibration(path)
    assert calibration.get("fp", "plan") is None
    assert "is corrupt" in caplog.text and str(path) in caplog.text
    calibration.put("fp", "plan", {"cpu": GiB})  # and the next measurement repairs it
    assert Calibration(path).get("fp", "plan") == {"cpu": GiB}


def test_a_missing_file_is_empty_without_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert Calibration(tmp_path / "absent.json").get("fp", "plan") is None
    assert caplog.records == []


# --------------------------------------------------------------------------- keys and values


FILES = [
    ("config.json", 700, 1000.0),
    ("model-00001-of-00002.safetensors", 5 * GiB, 1001.5),
    ("model-00002-of-00002.safetensors", 3 * GiB, 1002.25),
]


def test_fingerprint_changes_when_a_file_changes() -> None:
    base = checkpoint_fingerprint("/models/m", FILES)
    assert len(base) == 16 and int(base, 16) >= 0
    assert checkpoint_fingerprint("/models/m", list(reversed(FILES))) == base  # order does not matter
    resized = [FILES[0], (FILES[1][0], FILES[1][1] + 1, FILES[1][2]), FILES[2]]
    touched = [FILES[0], FILES[1], (FILES[2][0], FILES[2][1], FILES[2][2] + 0.5)]
    renamed = [("config.json", 700, 1000.0), ("model.safetensors", 5 * GiB, 1001.5), FILES[2]]
    variants = {
        base,
        checkpoint_fingerprint("/models/m", resized),
        checkpoint_fingerprint("/models/m", touched),
        checkpoint_fingerprint("/models/m", renamed),
        checkpoint_fingerprint("/models/m", FILES[:2]),
        checkpoint_fingerprint("org/other-id", FILES),
    }
    assert len(variants) == 6


def test_checkpoint_files_lists_weights_and_configs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "README.md").write_text("not part of the fingerprint")
    os.utime(tmp_path / "model.safetensors", (1234.0, 1234.0))
    files = checkpoint_files(tmp_path)
    assert [(name, size) for name, size, _ in files] == [("config.json", 2), ("model.safetensors", 10)]
    assert files[1][2] == 1234.0
    before = checkpoint_fingerprint(str(tmp_path), files)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert checkpoint_fingerprint(str(tmp_path), checkpoint_files(tmp_path)) != before


PLAN = Plan(
    rung="cpu",
    dtype="bfloat16",
    quantization="none",
    context_tokens=4096,
    concurrency=4,
    max_batch_tokens=2048,
    devices={"cpu": DeviceNeed(weights_bytes=10, runtime_bytes=10, free_bytes=100)},
    device_map={"embed": "cpu", "layer.0": "cpu", "head": "cpu"},
)


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"devices": {"cpu": DeviceNeed(weights_bytes=11, runtime_bytes=14, free_bytes=50)}}, True),
        ({"device_map": {"head": "cpu", "layer.0": "cpu", "embed": "cpu"}}, True),  # key order
        ({"rung": "gpu"}, False),
        ({"dtype": "float32"}, False),
        ({"quantization": "int8"}, False),
        ({"context_tokens": 2048}, False),
        ({"concurrency": 8}, False),
        ({"max_batch_tokens": 512}, False),
        ({"device_map": {"embed": "cpu", "layer.0": "cuda:0", "head": "cpu"}}, False),
    ],
)
def test_plan_key_follows_only_the_fields_that_change_memory(change: dict, same: bool) -> None:
    key = plan_key(PLAN)
    assert len(key) == 16
    assert (plan_key(replace(PLAN, **change)) == key) is same


@pytest.mark.parametrize(
    ("plan", "measured", "expected"),
    [
        ({"cpu": 4 * GiB}, None, {"cpu": 4 * GiB}),
        ({"cpu": 4 * GiB}, {"cpu": 3 * GiB}, {"cpu": 3 * GiB}),  # measured below the plan: trust it
        ({"cpu": 4 * GiB}, {"cpu": 5 * GiB}, {"cpu": 5 * GiB}),
        ({"cpu": GiB, "cuda:0": 8 * GiB}, {"cuda:0": 6 * GiB}, {"cpu": GiB, "cuda:0": 6 * GiB}),  # per device
        ({"cuda:0": 8 * GiB}, {"cpu": GiB, "cuda:0": 8 * GiB}, {"cpu": GiB, "cuda:0": 8 * GiB}),
    ],
    ids=["no measurement", "measured below", "measured above", "one device measured", "unplanned device"],
)
def test_calibrated_prefers_the_measured_peak(
    plan: dict[str, int], measured: dict[str, int] | None, expected: dict[str, int]
) -> None:
    assert calibrated(plan, measured) == expected


def test_a_raised_reservation_keeps_the_runners_samples() -> None:
    book = ledger()
    book.reserve("m", {"cpu": 2 * GiB})
    book.measure("m", {"cpu": 3 * GiB})
    book.raise_reservation("m", {"cpu": 4 * GiB})
    assert book.reserved("m") == {"cpu": 4 * GiB} and book.measured("m") == {"cpu": 3 * GiB}
    book.reserve("m", {"cpu": GiB})  # a new load: its own plan, no samples yet
    assert book.measured("m") == {} and book.held("m") == {"cpu": GiB}
    with pytest.raises(InvalidArgument, match="holds no reservation"):
        book.raise_reservation("other", {"cpu": GiB})
