"""Which idle runners to stop so that a new plan fits: a pure function, tested as a table.

``choose_evictions(need_bytes, free_bytes, residents)`` answers

- ``[]`` when the need already fits the free bytes on every device;
- ``None`` when stopping every evictable resident would still leave a device short (the pool then
  waits for busy runners or answers with the planner's NoFit);
- otherwise the names of the runners to stop, least recently used first.

A resident is *evictable* when it is ``ready``, has no lease and is not pinned. Runners that are
starting, loading or warming are never stopped to make room (their load would be wasted and their
bytes are still being measured); draining ones are already on their way out; failed and stopped ones
hold nothing. Only evictable residents that hold bytes on a device that is short are *candidates*:
stopping any other would free memory nobody asked for.

Among the sets of candidates whose held bytes cover the deficit (need − free) on every device, the
choice is, in order:

1. the fewest bytes freed, summed over every device (stopping a runner frees all it holds, so this
   is the least work thrown away);
2. then the lowest total ``reload_seconds`` (what it costs to bring them back);
3. then LRU: the set whose most recently used member is the oldest;
4. then the names, sorted and compared as a tuple, so the answer never depends on input order.

Up to ``EXACT_LIMIT`` (16) candidates every set is considered (a depth-first search that prunes a
branch once its bytes, reload cost and recency are already worse than the best cover found). Beyond
that the search is greedy: repeatedly take the candidate that alone covers what is still short with
the fewest bytes (then reload cost, recency, name), or, when none does, the one that frees the most
of what is still short; then drop, largest first, every chosen runner the others already cover for.
The greedy answer always covers the need and is minimal (no member can be left out), but it may free
more bytes than the best set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from memserve.pool.state import ModelState

EXACT_LIMIT = 16
EVICTABLE_STATE = ModelState.READY


@dataclass(frozen=True)
class Resident:
    """A runner as the eviction policy sees it: what it holds, whether it is busy, what it costs to reload."""

    name: str
    state: ModelState | str  # a ModelState (its string compares equal)
    held_bytes: Mapping[str, int]  # per device ("cpu", "cuda:0"): what the ledger holds for it
    leases: int  # requests in flight; > 0 is never evicted
    last_used: float  # monotonic seconds of the last request end (or the time it became ready)
    pinned: bool = False
    reload_seconds: float = 0.0  # what loading it again would cost (measured load time, or an estimate)

    @property
    def evictable(self) -> bool:
        return self.state == EVICTABLE_STATE and self.leases == 0 and not self.pinned

    @property
    def total_bytes(self) -> int:
        return sum(self.held_bytes.values())


_Key = tuple[int, float, float, tuple[str, ...]]


def choose_evictions(
    need_bytes: Mapping[str, int], free_bytes: Mapping[str, int], residents: Sequence[Resident]
) -> list[str] | None:
    """The runners to stop so that ``need_bytes`` fits, LRU first; ``[]`` if it fits, ``None`` if it never can.

    A device missing from ``free_bytes`` has nothing free.
    """
    deficit = _deficit(need_bytes, free_bytes)
    if not deficit:
        return []
    evictable = [r for r in residents if r.evictable]
    if not _covers(evictable, deficit):
        return None
    candidates = [r for r in evictable if any(r.held_bytes.get(device, 0) > 0 for device in deficit)]
    chosen = _exact(candidates, deficit) if len(candidates) <= EXACT_LIMIT else _greedy(candidates, deficit)
    return [r.name for r in sorted(chosen, key=lambda r: (r.last_used, r.name))]


def _deficit(need_bytes: Mapping[str, int], free_bytes: Mapping[str, int]) -> dict[str, int]:
    """Bytes still missing per device; devices that already fit are left out."""
    short = {device: need - free_bytes.get(device, 0) for device, need in need_bytes.items()}
    return {device: missing for device, missing in short.items() if missing > 0}


def _covers(chosen: Sequence[Resident], deficit: Mapping[str, int]) -> bool:
    return all(sum(r.held_bytes.get(device, 0) for r in chosen) >= missing for device, missing in deficit.items())


def _key(chosen: Sequence[Resident]) -> _Key:
    """The order of preference between covering sets; smaller is better."""
    return (
        sum(r.total_bytes for r in chosen),
        sum(r.reload_seconds for r in chosen),
        max(r.last_used for r in chosen),
        tuple(sorted(r.name for r in chosen)),
    )


def _exact(candidates: Sequence[Resident], deficit: Mapping[str, int]) -> list[Resident]:
    """The best covering set over all subsets, by depth-first search with pruning.

    Bytes, reload cost and the newest ``last_used`` only grow as members are added, and every
    candidate holds bytes on a short device, so a superset of a cover frees strictly more: the search
    stops extending a set once it covers, once it is no better than the best cover on those three,
    once its bytes plus what is still short exceed the best cover's bytes, or once the candidates
    left cannot make up what is still short.
    """
    # largest first: a tight cover is found early, so the bounds prune more (about 4× faster on random 16-model hosts)
    order = sorted(candidates, key=lambda r: (-r.total_bytes, r.reload_seconds, r.last_used, r.name))
    devices = list(deficit)
    # what order[i:] could still free on each short device
    suffix = [[0] * len(devices) for _ in range(len(order) + 1)]
    for i in range(len(order) - 1, -1, -1):
        suffix[i] = [suffix[i + 1][d] + order[i].held_bytes.get(device, 0) for d, device in enumerate(devices)]
    best: list[Resident] = []
    best_key: _Key | None = None

    def search(start: int, chosen: list[Resident], short: list[int]) -> None:
        nonlocal best, best_key
        if chosen:
            key = _key(chosen)
            if all(missing <= 0 for missing in short):
                if best_key is None or key < best_key:
                    best, best_key = list(chosen), key
                return
            if best_key is not None and key[:3] >= best_key[:3]:
                return
            # whatever is still short must be freed on top, on each device: a lower bound on the bytes
            if best_key is not None and key[0] + sum(m for m in short if m > 0) > best_key[0]:
                return
        if any(missing > suffix[start][d] for d, missing in enumerate(short)):
            return
        for index in range(start, len(order)):
            member = order[index]
            left = [missing - member.held_bytes.get(device, 0) for missing, device in zip(short, devices, strict=True)]
            chosen.append(member)
            search(index + 1, chosen, left)
            chosen.pop()

    search(0, [], [deficit[device] for device in devices])
    return best


def _greedy(candidates: Sequence[Resident], deficit: Mapping[str, int]) -> list[Resident]:
    """Best fit first, else the largest contribution; then drop members the others cover for.

    Callers have checked that all candidates together cover the deficit, so each round finds a
    candidate that frees some of what is still short.
    """
    remaining = dict(deficit)
    pool = list(candidates)
    chosen: list[Resident] = []
    while remaining:
        covering = [r for r in pool if _covers([r], remaining)]
        if covering:
            pick = min(covering, key=lambda r: _key([r]))
        else:
            pick = min(pool, key=lambda r: (-_useful_bytes(r, remaining), *_key([r])))
        chosen.append(pick)
        pool.remove(pick)
        remaining = {
            device: missing - pick.held_bytes.get(device, 0)
            for device, missing in remaining.items()
            if missing - pick.held_bytes.get(device, 0) > 0
        }
    for member in sorted(chosen, key=lambda r: (-r.total_bytes, r.name)):
        rest = [r for r in chosen if r is not member]
        if rest and _covers(rest, deficit):
            chosen = rest
    return chosen


def _useful_bytes(resident: Resident, remaining: Mapping[str, int]) -> int:
    """How much of what is still short this resident would free (capped per device at the shortfall)."""
    return sum(min(resident.held_bytes.get(device, 0), missing) for device, missing in remaining.items())
