"""The watchdog's loops: sample each runner's memory and the host's, and kill on the pure policy's answer.

One loop per runner (from its start until it exits or is replaced) and one for the host. Samples go into
the ledger (``measure``) and the entry's peak; what is past its limit, and which runner to stop when the
host runs low, is decided by ``pool/watchdog.py``. Killing is the pool's (``kill``), so that the kill is
recorded as one of its events and the runner's end is handled by the pool's monitor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from memserve.config import Settings
from memserve.pool.clock import Clock
from memserve.pool.entry import Entry, raise_peak
from memserve.pool.ledger import Ledger
from memserve.pool.runner_process import RunnerHandle
from memserve.pool.watchdog import Watched, breach_reason, first_breach, floor_reason, host_victim


class Kill(Protocol):
    def __call__(self, entry: Entry, runner: RunnerHandle, reason: str, **fields: Any) -> None: ...


class Watchdog:
    """Samples memory on the pool's clock and asks the pool to kill what the policy names."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        clock: Clock,
        entries: Mapping[str, Entry],
        host_available_bytes: Callable[[], int],
        kill: Kill,
    ) -> None:
        self.settings, self.ledger, self.clock, self.entries = settings, ledger, clock, entries
        self.host_available_bytes, self.kill = host_available_bytes, kill
        self.last_available_bytes: int | None = None  # the host's last sample, for /metrics

    def interval(self, loading: bool) -> float:
        """Seconds between samples: shorter while something loads (a load grows fastest)."""
        s = self.settings
        return s.watchdog_loading_interval_seconds if loading else s.watchdog_interval_seconds

    async def watch_runner(self, entry: Entry, runner: RunnerHandle) -> None:
        """Sample one runner's memory; kill it at the first sample past its reservation by more than the tolerance.

        The kill's event carries that sample and the one before it (``previous_bytes``, 0 for none), so it shows
        how far the runner grew between two samples: on a busy host the samples come late and the step is larger."""
        s = self.settings
        previous: dict[str, int] = {}
        while entry.runner is runner and runner.returncode is None:
            sample = runner.sample_memory()
            if sample:
                raise_peak(entry.peak_bytes, sample)
                self.ledger.measure(entry.name, sample)
                breach = first_breach(
                    sample,
                    self.ledger.reserved(entry.name),
                    tolerance=s.watchdog_tolerance,
                    tolerance_min_bytes=s.watchdog_tolerance_min_bytes,
                )
                if breach is not None:
                    reason = breach_reason(breach, entry.state)
                    self.kill(
                        entry,
                        runner,
                        reason,
                        device=breach.device,
                        measured_bytes=breach.measured_bytes,
                        limit_bytes=breach.limit_bytes,
                        previous_bytes=previous.get(breach.device, 0),
                    )
                    return
                previous = sample
            await self.clock.sleep(self.interval(entry.state.loading))

    async def watch_host(self) -> None:
        """Kill one runner when the host's available memory drops below the floor (``host_victim`` chooses)."""
        floor = self.settings.host_floor_bytes
        while True:
            await self.clock.sleep(self.interval(any(e.state.loading for e in self.entries.values())))
            available = self.last_available_bytes = self.host_available_bytes()
            watched = [
                Watched(e.name, e.state, self.ledger.measured(e.name), self.ledger.reserved(e.name))
                for e in self.entries.values()
                if e.runner is not None and e.runner.returncode is None
            ]
            name = host_victim(available, floor, watched)
            if name is None:
                continue
            victim = self.entries[name]
            assert victim.runner is not None
            reason = floor_reason(available, floor, victim.state)
            self.kill(victim, victim.runner, reason, available_bytes=available)


__all__ = ["Kill", "Watchdog"]
