"""The records that cross a process boundary round-trip through their JSON, and keep the JSON's shape."""

from __future__ import annotations

import json

import pytest

from memserve.pool.events import EventLog, PoolEvent, PoolEventKind
from memserve.pool.state import LOADING_STATES, ModelState
from memserve.wire.events import (
    EngineFallback,
    Failed,
    Listening,
    OtherEvent,
    PhaseDone,
    Ready,
    RunnerEvent,
    TestBalloon,
    peak_bytes,
    runner_event_from_json,
)

MEMORY = {
    "cpu": {"rss_bytes": 300, "anon_bytes": 200, "file_bytes": 100, "peak_rss_bytes": 400},
    "cuda:0": {"allocated_bytes": 10, "reserved_bytes": 20, "peak_reserved_bytes": 30},
}


@pytest.mark.parametrize(
    "event",
    [
        PhaseDone("resolve", 0.01, MEMORY, details={"path": "/models/m"}),
        PhaseDone(
            "worst_case",
            1.5,
            MEMORY,
            peak_bytes={"cpu": 500},
            needs_bytes={"cpu": 600},
            details={"fits": False, "sequences": 1, "planned_sequences": 4, "reserved_bytes": {"cpu": 450}},
        ),
        Ready("tiny", "continuous-batching", MEMORY, {"fits": True, "sequences": 2}),
        Listening(socket="/tmp/r.sock"),
        Listening(port=8001),
        Failed("no such checkpoint"),
        EngineFallback("generate", "no paged attention"),
        TestBalloon(8 << 20),
        OtherEvent("evicted", {"model": "tiny"}),
    ],
    ids=lambda e: type(e).__name__,
)
def test_runner_events_round_trip_through_their_json_line(event: RunnerEvent) -> None:
    line = json.dumps(event.to_json())
    assert runner_event_from_json(json.loads(line)) == event
    assert json.loads(line)["event"] == (event.kind if isinstance(event, OtherEvent) else event.KIND)


def test_a_phase_line_keeps_its_flat_shape() -> None:
    """What the gateway's pipe, estimate_accuracy and people's scripts read: one flat object per line."""
    event = PhaseDone("worst_case", 1.5, {"cpu": {"rss_bytes": 1}}, peak_bytes={"cpu": 5}, details={"fits": True})
    assert event.to_json() == {
        "event": "phase",
        "phase": "worst_case",
        "seconds": 1.5,
        "fits": True,
        "peak_bytes": {"cpu": 5},
        "memory": {"cpu": {"rss_bytes": 1}},
    }


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"phase": "map"},
        {"event": 3},
        {"event": "phase", "phase": "map"},  # no seconds
        {"event": "phase", "phase": "map", "seconds": 1, "memory": {"cpu": {"rss_bytes": "lots"}}},
        {"event": "ready", "model": "m"},  # no engine
        {"event": "listening", "socket": 5},
        {"event": "test_balloon", "extra_bytes": True},
    ],
)
def test_a_malformed_event_is_a_value_error_not_a_key_error_later(data: object) -> None:
    with pytest.raises(ValueError):
        runner_event_from_json(data)


def test_peak_bytes_reads_the_runners_own_peaks_per_device() -> None:
    assert peak_bytes(MEMORY) == {"cpu": 400, "cuda:0": 30}
    assert peak_bytes({"cpu": {"rss_bytes": 1}}) == {}


def test_pool_events_round_trip_and_keep_their_flat_json() -> None:
    event = PoolEvent(7, 1.7e9, PoolEventKind.LOAD, "demo", {"rung": "cpu", "reserved_bytes": {"cpu": 1}})
    data = event.to_json()
    assert data == {
        "seq": 7,
        "time": 1.7e9,
        "event": "load",
        "model": "demo",
        "rung": "cpu",
        "reserved_bytes": {"cpu": 1},
    }
    assert PoolEvent.from_json(json.loads(json.dumps(data))) == event
    newer = PoolEvent.from_json({"seq": 8, "event": "adapter_loaded", "model": "demo"})  # a newer server's kind
    assert newer.kind == "adapter_loaded" and newer.to_json()["event"] == "adapter_loaded"
    with pytest.raises(ValueError):
        PoolEvent.from_json({"event": "load", "model": "demo"})


def test_model_states_are_their_json_strings() -> None:
    assert json.dumps({"state": ModelState.READY}) == '{"state": "ready"}'
    assert ModelState("warming") is ModelState.WARMING and ModelState.WARMING == "warming"
    assert {s for s in ModelState if s.loading} == LOADING_STATES == {"starting", "loading", "warming"}


def test_event_log_listeners_hear_each_event_once_and_a_failing_one_stops_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = EventLog(wall=lambda: 100.0, kept=2)
    heard: list[PoolEvent] = []

    def broken(event: PoolEvent) -> None:
        raise RuntimeError("a listener's bug")

    events.subscribe(broken)
    unsubscribe = events.subscribe(heard.append)
    first = events.add(PoolEventKind.LOAD, "m", {"rung": "cpu"})
    assert heard == [first]
    assert "a pool event listener failed on load m rung=cpu" in caplog.text
    unsubscribe()
    events.add(PoolEventKind.READY, "m", {})
    assert heard == [first]  # no longer subscribed
    assert [e.seq for e in events] == [1, 2]  # the log itself kept both
