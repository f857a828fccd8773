"""Eviction as a table: what the new plan needs, what is free, who holds what → whom to stop."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence

import pytest

from memserve.pool import eviction
from memserve.pool.eviction import EXACT_LIMIT, Resident, choose_evictions

GiB = 1024**3


def r(
    name: str,
    cpu: float = 0,
    gpu: float = 0,
    *,
    state: str = "ready",
    leases: int = 0,
    last_used: float = 0.0,
    pinned: bool = False,
    reload: float = 0.0,
) -> Resident:
    """A resident holding ``cpu`` / ``gpu`` GiB (cuda:0)."""
    held = {dev: int(size * GiB) for dev, size in (("cpu", cpu), ("cuda:0", gpu)) if size}
    return Resident(name, state, held, leases, last_used, pinned, reload)


def gib(**sizes: float) -> dict[str, int]:
    """``gib(cpu=2, cuda0=3)`` → bytes per device."""
    return {("cuda:0" if dev == "cuda0" else dev): int(size * GiB) for dev, size in sizes.items()}


# id, need, free, residents, expected (names LRU first, or None)
TABLE = [
    ("nothing needed", {}, gib(cpu=1), [r("a", cpu=4)], []),
    ("need fits exactly in free", gib(cpu=4), gib(cpu=4), [r("a", cpu=4)], []),
    ("one device, one idle model frees enough", gib(cpu=4), gib(cpu=1), [r("a", cpu=3)], ["a"]),
    (
        "fewest bytes: the smaller cover wins over the older, bigger one",
        gib(cpu=4),
        gib(cpu=1),
        [r("big", cpu=8, last_used=1), r("small", cpu=3, last_used=50)],
        ["small"],
    ),
    (
        "two small models free fewer bytes than one big one; LRU first",
        gib(cpu=4),
        gib(cpu=1),
        [r("a", cpu=2, last_used=20), r("b", cpu=2, last_used=10), r("c", cpu=5)],
        ["b", "a"],
    ),
    (
        "two devices: one model frees cpu, another cuda",
        gib(cpu=4, cuda0=6),
        gib(cpu=1, cuda0=1),
        [r("cpu-model", cpu=4, last_used=30), r("gpu-model", gpu=6, cpu=0.5, last_used=20), r("other", cpu=1)],
        ["gpu-model", "cpu-model"],
    ),
    (
        "two devices: one model holding both beats a pair freeing more",
        gib(cpu=2, cuda0=4),
        gib(),
        [r("both", cpu=2, gpu=4), r("cpu-only", cpu=3), r("gpu-only", gpu=4)],
        ["both"],
    ),
    (
        "a model only on a device that is not short is left alone",
        gib(cuda0=2),
        gib(cpu=0, cuda0=0),
        [r("cpu-old", cpu=1, last_used=0), r("gpu-new", gpu=3, last_used=99)],
        ["gpu-new"],
    ),
    (
        "an idle model that holds nothing is not stopped, even where its name sorts first",
        gib(cpu=2),
        gib(),
        [r("aaa-empty"), r("b", cpu=2)],
        ["b"],
    ),
    ("a device missing from free has nothing free", gib(cuda0=2), gib(cpu=8), [r("g", gpu=2)], ["g"]),
    (
        "pinned is never evicted",
        gib(cpu=2),
        gib(),
        [r("pinned", cpu=2, pinned=True), r("bigger", cpu=6, last_used=50)],
        ["bigger"],
    ),
    (
        "leased is never evicted",
        gib(cpu=2),
        gib(),
        [r("busy", cpu=2, leases=1), r("bigger", cpu=6, last_used=50)],
        ["bigger"],
    ),
    (
        "loading, warming and starting are never evicted",
        gib(cpu=2),
        gib(),
        [
            r("l", cpu=4, state="loading"),
            r("w", cpu=4, state="warming"),
            r("s", cpu=4, state="starting"),
            r("ready", cpu=9),
        ],
        ["ready"],
    ),
    (
        "draining, stopped and failed are not candidates",
        gib(cpu=2),
        gib(),
        [r("d", cpu=4, state="draining"), r("x", cpu=4, state="stopped"), r("f", cpu=4, state="failed")],
        None,
    ),
    (
        "equal bytes: the lower reload cost wins over LRU",
        gib(cpu=2),
        gib(),
        [r("slow", cpu=2, reload=30.0, last_used=1), r("fast", cpu=2, reload=5.0, last_used=90)],
        ["fast"],
    ),
    (
        "equal bytes and reload: least recently used wins",
        gib(cpu=2),
        gib(),
        [r("recent", cpu=2, reload=5.0, last_used=90), r("old", cpu=2, reload=5.0, last_used=10)],
        ["old"],
    ),
    (
        "sets tie on bytes and reload: the one whose newest member is oldest wins, not the one with the oldest",
        gib(cpu=4),
        gib(),
        [r("x", cpu=2, last_used=1), r("y", cpu=2, last_used=40), r("big", cpu=4, last_used=30)],
        ["big"],
    ),
    (
        "uniform sizes: the two least recently used",
        gib(cpu=4),
        gib(),
        [
            r("a", cpu=2, last_used=1),
            r("b", cpu=2, last_used=50),
            r("c", cpu=2, last_used=20),
            r("d", cpu=2, last_used=30),
        ],
        ["a", "c"],
    ),
    (
        "everything ties: the name decides, whatever the input order",
        gib(cpu=2),
        gib(),
        [r("zeta", cpu=2, last_used=5), r("alpha", cpu=2, last_used=5)],
        ["alpha"],
    ),
    (
        "impossible: idle models together are short; a leased one would do",
        gib(cpu=10),
        gib(cpu=1),
        [r("a", cpu=3), r("b", cpu=3), r("busy", cpu=20, leases=2)],
        None,
    ),
    ("impossible on one of two devices", gib(cpu=2, cuda0=8), gib(), [r("a", cpu=4, gpu=2), r("b", gpu=3)], None),
    ("nothing resident and not enough free", gib(cpu=1), gib(cpu=0), [], None),
]


@pytest.mark.parametrize(
    ("need", "free", "residents", "expected"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_choose_evictions(
    need: dict[str, int], free: dict[str, int], residents: list[Resident], expected: list[str] | None
) -> None:
    assert choose_evictions(need, free, residents) == expected
    assert choose_evictions(need, free, list(reversed(residents))) == expected


# ------------------------------------------------------------------------- against brute force


def _covers(chosen: Sequence[Resident], deficit: Mapping[str, int]) -> bool:
    return all(sum(x.held_bytes.get(d, 0) for x in chosen) >= m for d, m in deficit.items())


def _reference(need: Mapping[str, int], free: Mapping[str, int], residents: Sequence[Resident]) -> list[str] | None:
    """The rule written out naively: every subset of the evictable residents, smallest key wins."""
    deficit = {d: n - free.get(d, 0) for d, n in need.items() if n - free.get(d, 0) > 0}
    if not deficit:
        return []
    # a resident that frees nothing where memory is short is never stopped (else the name tie-break
    # could prefer a set padded with it)
    evictable = [
        x
        for x in residents
        if x.state == "ready" and x.leases == 0 and not x.pinned and any(x.held_bytes.get(d, 0) > 0 for d in deficit)
    ]
    best: tuple | None = None
    for size in range(1, len(evictable) + 1):
        for subset in itertools.combinations(evictable, size):
            if not _covers(subset, deficit):
                continue
            key = (
                sum(sum(x.held_bytes.values()) for x in subset),
                sum(x.reload_seconds for x in subset),
                max(x.last_used for x in subset),
                tuple(sorted(x.name for x in subset)),
            )
            if best is None or key < best:
                best = key
    if best is None:
        return None
    by_name = {x.name: x for x in evictable}
    return sorted(best[3], key=lambda n: (by_name[n].last_used, n))


def _random_case(rng: random.Random, count: int) -> tuple[dict[str, int], dict[str, int], list[Resident]]:
    residents = [
        Resident(
            name=f"m{i}",
            state=rng.choice(["ready"] * 6 + ["loading", "draining"]),
            held_bytes={d: rng.randint(0, 6) for d in ("cpu", "cuda:0") if rng.random() < 0.7},
            leases=rng.choice([0, 0, 0, 1]),
            last_used=float(rng.randint(0, 5)),
            pinned=rng.random() < 0.1,
            reload_seconds=float(rng.randint(0, 3)),
        )
        for i in range(count)
    ]
    need = {"cpu": rng.randint(0, 12), "cuda:0": rng.randint(0, 12)}
    free = {"cpu": rng.randint(0, 4), "cuda:0": rng.randint(0, 4)}
    return need, free, residents


def test_exact_search_agrees_with_brute_force_on_random_hosts() -> None:
    """Small integers make many ties, which is where pruning and tie-breaks go wrong."""
    rng = random.Random(4)
    answered = 0
    for _ in range(400):
        need, free, residents = _random_case(rng, rng.randint(0, 9))
        expected = _reference(need, free, residents)
        assert choose_evictions(need, free, residents) == expected, (need, free, residents)
        answered += bool(expected)
    assert answered > 100  # the cases are not all trivial


# ------------------------------------------------------------------------------ greedy beyond 16


def _crowd(count: int) -> list[Resident]:
    """``count`` idle models of 1..5 GiB on cpu, some also on cuda:0, used at distinct times."""
    rng = random.Random(count)
    return [
        r(f"m{i:02}", cpu=rng.randint(1, 5), gpu=rng.choice([0, 0, 2, 3]), last_used=float(i), reload=rng.random())
        for i in range(count)
    ]


@pytest.mark.parametrize("count", [EXACT_LIMIT + 1, 40, 200])
def test_many_residents_use_greedy_and_still_cover_the_need(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_exact(*args: object) -> None:
        raise AssertionError("exact search used beyond EXACT_LIMIT candidates")

    monkeypatch.setattr(eviction, "_exact", no_exact)
    residents = _crowd(count)
    need, free = gib(cpu=30, cuda0=12), gib(cpu=2, cuda0=1)
    names = choose_evictions(need, free, residents)
    assert names
    chosen = [x for x in residents if x.name in names]
    deficit = {d: need[d] - free[d] for d in need}
    assert _covers(chosen, deficit)
    for member in chosen:  # minimal: no member can be left out
        assert not _covers([x for x in chosen if x is not member], deficit), member.name
    assert names == sorted(names, key=lambda n: next(x.last_used for x in residents if x.name == n))


def test_greedy_takes_the_smallest_single_cover_when_there_is_one() -> None:
    residents = [r(f"s{i:02}", cpu=1, last_used=i) for i in range(30)] + [r("fits", cpu=5), r("huge", cpu=50)]
    assert choose_evictions(gib(cpu=5), gib(), residents) == ["fits"]


def test_up_to_the_limit_the_search_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_greedy(*args: object) -> None:
        raise AssertionError("greedy used within EXACT_LIMIT candidates")

    monkeypatch.setattr(eviction, "_greedy", no_greedy)
    residents = [r(f"m{i:02}", cpu=1 + i % 4, last_used=i) for i in range(EXACT_LIMIT)]
    # every candidate is needed: the deficit equals everything they hold together
    total = sum(1 + i % 4 for i in range(EXACT_LIMIT))
    names = choose_evictions(gib(cpu=total), gib(), residents)
    assert names == [x.name for x in residents]
    # idle models that hold nothing on the short device are not candidates and do not count
    bystanders = [r(f"gpu{i}", gpu=1) for i in range(10)]
    assert choose_evictions(gib(cpu=total), gib(), residents + bystanders) == names
