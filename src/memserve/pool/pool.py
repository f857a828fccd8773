"""The ModelPool: the one owner of runner processes.

Only the pool starts, stops or evicts a runner; request handlers ask it for a lease and never check a
model's state and act on it themselves. Everything runs on one asyncio loop, so a check and the
mutation it gates happen with no ``await`` in between. Every wait, timer and timestamp goes through the
pool's ``Clock`` (``pool/clock.py``), so its tests run on virtual time.

Lifecycle of one model (``Entry``)::

    stopped ──lease/load──▶ starting ─▶ loading ─▶ warming ─▶ ready ──idle past keep_alive──▶ draining ─▶ stopped
                               │            │          │         │
                               └────────────┴──────────┴─────────┴──exit, OOM kill, watchdog──▶ failed (reason)

What each part promises (single flight, leases, admission against the ledger, keep-alive, the watchdog,
crashes and their backoff, compatibility instead of reload, fallback) is written once, in
``docs/design.md`` ("The pool"); the decisions are pure functions elsewhere: eviction
(``pool/eviction.py``), the watchdog's limit and victim (``pool/watchdog.py``, sampled by
``pool/watching.py``), the rung to load on (``pool/placement.py``), the bytes held (``pool/ledger.py``).

Here: **a kill is not an outage.** What a killed (or crashed) runner was seen to use past its reservation
is recorded, with the watchdog's tolerance on top, in the calibration for its (checkpoint, plan)
(``_learn``), so the next load of that plan reserves it: on the same rung while that fits the pool's
capacity, one rung lower when it does not (``Placement.choose``). The first kill on a rung is retried there
with the bigger reservation; a second one, where the policy allows (``retry_lower``), moves the model one
rung lower until ``unload``. A rung ruled out that way is still used when no lower rung fits: a model is
refused (507) only when it cannot fit even with nothing else loaded. A kill by the host floor (memory taken
by others) retries one rung lower in that load only.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from memserve.checkpoint.facts import check_adapters_on_base
from memserve.checkpoint.locate import with_adapter_sources
from memserve.config import Settings
from memserve.engines.fit import read_model_facts
from memserve.errors import (
    BadUpstream,
    Conflict,
    InsufficientMemory,
    MemoryBusy,
    MemserveError,
    ModelNotFound,
    Overloaded,
    RunnerFailed,
    error_type_for,
)
from memserve.memory.fit import ModelFacts, PlanFile
from memserve.memory.inventory import Inventory
from memserve.memory.planner import Plan, Policy, validate_request
from memserve.memory.probe import available_ram_bytes
from memserve.pool.clock import Clock, LoopClock, wait_event
from memserve.pool.counters import PoolCounters
from memserve.pool.entry import Entry, Lease, backoff_seconds, compatible, keep_alive, raise_peak
from memserve.pool.events import EventLog, PoolEventKind, sizes
from memserve.pool.eviction import Resident, choose_evictions
from memserve.pool.ledger import Calibration, Ledger, plan_key
from memserve.pool.placement import Choice, Placement, fingerprint, load_options, request_for
from memserve.pool.runner_process import RunnerHandle, Spawner, new_run_dir, process_spawner
from memserve.pool.state import ModelState
from memserve.pool.watchdog import learned_bytes, watchdog_limit_bytes
from memserve.pool.watching import Watchdog
from memserve.units import format_bytes
from memserve.wire.events import PhaseDone, Ready, RunnerEvent, peak_bytes
from memserve.wire.routes import RUNNER_ADAPTER_ADD, RUNNER_ADAPTER_REMOVE

log = logging.getLogger("memserve.pool")

STOPPED, STARTING, LOADING, WARMING, READY, DRAINING, FAILED = (
    ModelState.STOPPED,
    ModelState.STARTING,
    ModelState.LOADING,
    ModelState.WARMING,
    ModelState.READY,
    ModelState.DRAINING,
    ModelState.FAILED,
)
_PHASE_STATES = {"resolve": LOADING, "map": LOADING, "fault_in": WARMING, "warm_up": WARMING}
_DRAIN_TIMEOUT_SECONDS = 30.0
_STABLE_SECONDS = 60.0  # a runner ready this long before it crashed starts the failure count again
_KILLS_BEFORE_LOWER = 2  # kills on one rung (each with the bigger reservation the last one taught) before going lower


class ModelPool:
    """Loads, leases, expires, evicts and watches the runners of the configured models."""

    def __init__(
        self,
        settings: Settings,
        inventory: Inventory,
        *,
        spawner: Spawner | None = None,
        clock: Clock | None = None,
        host_available_bytes: Callable[[], int] = available_ram_bytes,
        facts_reader: Callable[[str], ModelFacts] = read_model_facts,
    ) -> None:
        self.settings = settings
        self.inventory = inventory
        self._run_dir = new_run_dir()  # owner recorded; the folders of dead gateways go
        gpu_totals = {d.name: d.total_bytes for d in inventory.gpus}  # vLLM's memory share is a fraction of these
        self._spawn = spawner or process_spawner(self._run_dir, gpu_total_bytes=lambda: gpu_totals)
        self._clock: Clock = clock or LoopClock()
        self._read_facts = facts_reader
        self.ledger = Ledger(
            {
                d.name: d.free_bytes if d.budget_bytes is None else min(d.free_bytes, d.budget_bytes)
                for d in inventory.devices
            },
            {d.name: d.headroom_bytes for d in inventory.devices},
        )
        self.calibration = Calibration(settings.data_dir / "calibration.json")
        self._placement = Placement(self.ledger, self.calibration, self.fit_inventory)
        self.entries: dict[str, Entry] = {
            m.name: Entry(
                m,
                keep_alive(m.keep_alive_seconds, settings.keep_alive_seconds),
                adapters={a.name: a.source for a in m.adapters},
            )
            for m in settings.models
        }
        self.history = EventLog(self._clock.wall)  # the records, the last 1,000
        self.counters = PoolCounters(self.entries)  # /metrics' lifecycle counters, from the events
        self.history.subscribe(self.counters.hear)
        self._change = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchdog = Watchdog(settings, self.ledger, self._clock, self.entries, host_available_bytes, self._kill)

    # ---------------------------------------------------------------------------------------------- public

    async def start(self) -> None:
        """Preload the models marked ``preload`` (in the background) and start the host watchdog."""
        self._spawn_task(self._watchdog.watch_host(), "host-watchdog")
        for entry in self.entries.values():
            if entry.config.preload:
                self._ensure_load(entry)

    async def acquire(self, name: str, *, keep_alive_seconds: float | None = None) -> Lease:
        """A lease on a ready runner for ``name``, loading it first if needed (single flight)."""
        entry = self.entry(name)
        if self._closing:
            raise MemoryBusy("the server is shutting down; retry on another server", retry_after_seconds=5)
        if entry.leases + entry.waiting >= entry.max_in_flight:
            self.counters.refused(name, Overloaded.code)  # no event: under overload it would flush the log
            raise Overloaded(
                f"model {name!r} has {entry.leases} requests in flight and {entry.waiting} waiting, its limit of "
                f"{entry.max_in_flight} (concurrency {entry.config.concurrency} + queue "
                f"{entry.max_in_flight - entry.config.concurrency}); retry after a few seconds or raise max_queue",
                retry_after_seconds=2.0,
            )
        if keep_alive_seconds is not None:
            entry.keep_alive_seconds = keep_alive(keep_alive_seconds, self.settings.keep_alive_seconds)
        entry.waiting += 1
        entry.cancel_expiry()
        try:
            while entry.state != READY or entry.runner is None:
                await asyncio.shield(self._ensure_load(entry))
            entry.leases += 1
            return Lease(entry, entry.runner, self._release)
        finally:
            entry.waiting -= 1
            if entry.leases == 0 and entry.waiting == 0 and entry.state == READY:
                self._schedule_expiry(entry)

    async def load(
        self,
        name: str,
        *,
        keep_alive_seconds: float | None = None,
        context_tokens: int | None = None,
        concurrency: int | None = None,
    ) -> dict[str, Any]:
        """Load ``name`` (or keep the loaded runner when it is compatible) and return its /api/ps row.

        ``context_tokens`` and ``concurrency`` are checked first (InvalidArgument, with nothing stored and no
        runner stopped) and apply to the one load this call starts: they are forgotten when it returns, so a
        later load (the next request after an eviction, say) plans from the model's configuration again.
        """
        entry = self.entry(name)
        options = await self._checked_options(entry, context_tokens=context_tokens, concurrency=concurrency)
        if options and entry.load_task is not None:
            with contextlib.suppress(Exception):  # judge compatibility against what that load brings
                await asyncio.shield(entry.load_task)
        if entry.plan is not None and entry.runner is not None and not compatible(entry.plan, **_both(options)):
            self._event(
                PoolEventKind.RELOAD,
                entry,
                reason=f"asked for {options}, loaded plan has context "
                f"{entry.plan.context_tokens} × {entry.plan.concurrency}",
            )
            await self.unload(name)
        if options and entry.runner is None:
            entry.pending_options = options  # no await since the check: the next load to start takes them
        try:
            lease = await self.acquire(name, keep_alive_seconds=keep_alive_seconds)
        finally:
            if entry.pending_options is options:
                entry.pending_options = None
        lease.release()
        return self.row(entry)

    async def unload(self, name: str) -> bool:
        """Drain ``name`` (wait for its leases, up to 30 s) and stop its runner, or clear a failed model.

        Either way the model's failure record goes (reason, failure count, the rungs its kills ruled out),
        so the next request loads it fresh; what was measured stays in the calibration, because it is
        still true. False when there was nothing to stop or clear.
        """
        entry = self.entry(name)
        if entry.load_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(entry.load_task)
        if entry.runner is None:
            if entry.state != FAILED:
                return False
            self._forget_failures(entry)
            entry.reason = None
            self._set_state(entry, STOPPED)
            self._event(PoolEventKind.CLEARED, entry, reason="failed model cleared by unload")
            return True
        entry.state = DRAINING
        deadline = self._clock.now() + _DRAIN_TIMEOUT_SECONDS
        while entry.leases > 0 and self._clock.now() < deadline:
            await self._wait_change(deadline - self._clock.now())
        await self._stop(entry, "unloaded on request", cause="unload", deliberate=True)
        self._forget_failures(entry)
        return True

    async def shutdown(self) -> None:
        """Stop every runner (the HTTP server has already drained its requests) and every pool task."""
        self._closing = True
        for entry in self.entries.values():
            entry.cancel_expiry()
            if entry.load_task is not None:
                entry.load_task.cancel()
        await asyncio.gather(
            *(self._stop(e, "server shutting down", cause="shutdown") for e in self.entries.values() if e.runner),
            return_exceptions=True,
        )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def entry(self, name: str) -> Entry:
        """The configured model ``name``; ModelNotFound (404) listing close names otherwise."""
        if name in self.entries:
            return self.entries[name]
        close = difflib.get_close_matches(name, list(self.entries), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"configured: {', '.join(self.entries) or 'none'}"
        raise ModelNotFound(
            f"model {name!r} is not configured on this server; {hint} "
            "(add it to memserve.yaml or pass --model NAME=SOURCE)",
            param="model",
        )

    def fit_inventory(self) -> Inventory:
        """The pool's whole capacity as an inventory with nothing held: what a plan may use at most."""
        capacity = self.ledger.to_json()["devices"]
        devices = tuple(
            replace(d, free_bytes=capacity[d.name]["capacity_bytes"], budget_bytes=None) for d in self.inventory.devices
        )
        return replace(self.inventory, devices=devices)

    def ps(self) -> dict[str, Any]:
        """The /api/ps body: every model that is not stopped, and the ledger's devices."""
        rows = [self.row(e) for e in self.entries.values() if e.state != STOPPED]
        return {"models": rows, "devices": self.ledger.to_json()["devices"]}

    def row(self, entry: Entry) -> dict[str, Any]:
        """The model's /api/ps row: its entry, and what the ledger holds for it."""
        expires = (
            None
            if entry.expires_at is None or math.isinf(entry.expires_at)
            else self._clock.wall() + (entry.expires_at - self._clock.now())
        )
        return entry.row(self.ledger.reserved(entry.name), self.ledger.measured(entry.name), expires)

    @property
    def host_available_bytes(self) -> int | None:
        """The host's available memory at the watchdog's last sample (None before the first)."""
        return self._watchdog.last_available_bytes

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON of every event kept, oldest first (``history`` holds them as records)."""
        return self.history.since(0)

    def events_since(self, seq: int = 0) -> list[dict[str, Any]]:
        """The JSON of the events after sequence number ``seq``, oldest first (``GET /api/events``)."""
        return self.history.since(seq)

    # ---------------------------------------------------------------------------------------------- adapters

    def adapter(self, model: str) -> tuple[str, str] | None:
        """(base, adapter) for a request's ``model`` that names an adapter, as ``adapter`` or ``base:adapter``."""
        base, colon, name = model.partition(":")
        for entry in self.entries.values():
            if (entry.name == base and name in entry.adapters) if colon else model in entry.adapters:
                return entry.name, name if colon else model
        return None

    def lora_scales(self, base: str, adapter: str | None) -> list[dict[str, float | int]] | None:
        """llama-server's per-request ``lora`` list for a request on ``base`` (its ``adapter``, or the base alone):
        every adapter the runner started with, by id, at scale 1 for the one asked for and 0 for the rest (a
        request that names none gets each at its start scale, 1: llama-server 0.3.36 applies
        ``--lora-init-without-apply`` to nothing). None for a model not served by llama.cpp or without adapters.

        The ids are the order of ``entry.adapters``, which the runner was started with: a llama.cpp model's
        adapters change only while no runner serves it (``add_adapter`` and ``remove_adapter`` refuse a ready one)."""
        entry = self.entries.get(base)
        if entry is None or entry.plan is None or entry.plan.runner != "llama.cpp" or not entry.adapters:
            return None
        return [{"id": i, "scale": 1.0 if name == adapter else 0.0} for i, name in enumerate(entry.adapters)]

    def _name_owner(self, name: str) -> str | None:
        """The model that already answers to ``name``, as itself or as one of its adapters; None if none does."""
        return next((e.name for e in self.entries.values() if name == e.name or name in e.adapters), None)

    def restore_adapter(self, name: str, adapter: str, source: str) -> str | None:
        """Put back adapter ``adapter`` (folder ``source``) on model ``name``, as one added at run time before a
        restart: before the pool starts, so the model's next load takes it. Why it cannot be, or None."""
        entry = self.entries.get(name)
        if entry is None:
            return f"the model {name!r} is not configured any more"
        taken = self._name_owner(adapter)
        if taken is not None:
            return f"the name is taken by model {taken!r} or one of its configured adapters"
        if not (Path(source) / "adapter_config.json").is_file():
            return f"{source} holds no adapter_config.json any more"
        base = Path(entry.config.source).expanduser()
        if base.is_dir():  # one stored before the add checked it on its base would fail every load of the base
            try:
                check_adapters_on_base([Path(source)], base)
            except MemserveError as exc:
                return exc.message
        entry.adapters[adapter] = source
        return None

    async def add_adapter(self, name: str, adapter: str, source: str) -> dict[str, Any]:
        """Put LoRA adapter ``adapter`` (folder ``source``) on model ``name``. A loaded base gets it at once,
        without a reload, when its weights fit beside what the ledger holds (the reservation grows by them);
        a stopped one loads with it. Returns the model's /api/ps row."""
        entry = self.entry(name)
        taken = self._name_owner(adapter)
        if taken is not None:
            raise Conflict(
                f"the name {adapter!r} is taken (by model {taken!r} or one of its adapters); remove that adapter "
                "first or choose another name"
            )
        base = await asyncio.to_thread(self._read_facts, entry.config.source)
        facts = (await asyncio.to_thread(with_adapter_sources, base, (source,))).adapters[-1]  # checked on its base
        if entry.state not in (READY, STOPPED, FAILED):
            raise Conflict(f"model {name!r} is {entry.state}; add the adapter when it is ready (or stopped)")
        if entry.state == READY and entry.runner is not None and entry.plan is not None:
            if entry.plan.runner != "transformers":
                raise Conflict(
                    f"model {name!r} is served by {entry.plan.runner}, which loads adapters only when it starts; "
                    "unload it (POST /api/unload) and add the adapter: it loads with the model"
                )
            device = next(iter(entry.plan.devices))  # the adapter's weights join the embed block's device
            free = self.ledger.free_bytes().get(device, 0)
            if facts.weights_bytes > free:
                raise InsufficientMemory(
                    f"adapter {adapter!r} needs {format_bytes(facts.weights_bytes)} on {device} beside model "
                    f"{name!r}, and {format_bytes(free)} is free; unload a model, or add it while {name!r} is "
                    "stopped so that it is planned with the model"
                )
            answer = await entry.runner.client.post(
                f"http://runner{RUNNER_ADAPTER_ADD.path}", json={"name": adapter, "source": source}
            )
            if answer.status_code != 200:
                raise _runner_refused(answer, f"runner {name}")
            reserved = self.ledger.reserved(name)
            self.ledger.raise_reservation(name, {**reserved, device: reserved.get(device, 0) + facts.weights_bytes})
        entry.adapters[adapter] = source
        self._event(PoolEventKind.ADAPTER, entry, adapter=adapter, action="added", weights_bytes=facts.weights_bytes)
        return self.row(entry)

    async def remove_adapter(self, name: str, adapter: str) -> dict[str, Any]:
        """Take adapter ``adapter`` off model ``name``: requests already running on it finish, new ones get 404.
        Its bytes stay reserved until the runner stops (freed tensors are not always given back to the OS)."""
        entry = self.entry(name)
        if adapter not in entry.adapters:
            listed = ", ".join(sorted(entry.adapters)) or "none"
            raise ModelNotFound(f"model {name!r} has no adapter {adapter!r} (its adapters: {listed})", param="name")
        if entry.state == READY and entry.runner is not None:
            if entry.plan is not None and entry.plan.runner != "transformers":  # llama-server's ids: fixed at start
                raise Conflict(
                    f"model {name!r} is served by {entry.plan.runner}, which loads adapters only when it starts; "
                    "unload it (POST /api/unload) and remove the adapter"
                )
            answer = await entry.runner.client.delete(f"http://runner{RUNNER_ADAPTER_REMOVE.path.format(name=adapter)}")
            if answer.status_code not in (200, 404):
                raise _runner_refused(answer, f"runner {name}")
        del entry.adapters[adapter]
        self._event(PoolEventKind.ADAPTER, entry, adapter=adapter, action="removed")
        return self.row(entry)

    # ---------------------------------------------------------------------------------------------- loading

    def _ensure_load(self, entry: Entry) -> asyncio.Task[None]:
        if entry.load_task is None:
            task = asyncio.create_task(self._load(entry), name=f"load-{entry.name}")
            entry.load_task = task
            task.add_done_callback(lambda t: self._load_done(entry, t))
        return entry.load_task

    def _load_done(self, entry: Entry, task: asyncio.Task[None]) -> None:
        entry.load_task = None
        if not task.cancelled() and task.exception() is not None:
            log.info("load of %s failed: %s", entry.name, task.exception())

    async def _load(self, entry: Entry) -> None:
        while entry.runner is not None:  # a draining runner of this model must be gone first
            await self._wait_change(None)
        options, entry.pending_options = entry.pending_options or {}, None
        if entry.failures:
            delay = backoff_seconds(entry.failures)
            if delay:
                self._event(PoolEventKind.BACKOFF, entry, seconds=delay)
                await self._clock.sleep(delay)
        self._set_state(entry, STARTING)  # visible in ps while it plans and waits for memory
        try:
            facts = await asyncio.to_thread(self._read_facts, entry.config.source)
            facts = await asyncio.to_thread(with_adapter_sources, facts, tuple(entry.adapters.values()))
            first = self._placement.first_choice(entry.name, entry.config, entry.skip_rungs, facts, options)
            policy, (planned, need) = first.policy, self._record(entry, first)
            while True:
                try:
                    await self._admit(entry, need)
                    await self._start_runner(entry, facts, planned, need)
                    return
                except RunnerFailed as exc:
                    killed, learned = entry.watchdog_reason, entry.learned
                    entry.watchdog_reason = None
                    if not killed and not learned:
                        raise
                    message = f"model {entry.name!r} was {killed}" if killed else exc.message
                    if not entry.config.policy.retry_lower or self._closing:
                        raise RunnerFailed(message) from None
                    rung = planned.rung
                    # what the failed runner was seen to use against what it had: said with every retry
                    seen = {"measured_bytes": dict(entry.peak_bytes), "failed_reserved_bytes": dict(need)}
                    if learned and entry.rung_kills.get(rung, 0) < _KILLS_BEFORE_LOWER:
                        try:  # the same plan with what the kill taught; one rung lower if that no longer fits
                            planned, need = self._record(entry, self._choose(entry, facts, policy, options))
                        except InsufficientMemory as refusal:
                            raise InsufficientMemory(f"{message}; {refusal.message}", param="model") from None
                        self._event(
                            PoolEventKind.RETRY,
                            entry,
                            rung=planned.rung,
                            reserved_bytes=need,
                            reason=killed or exc.message,
                            **seen,
                        )
                        continue
                    policy = policy.below(rung)
                    if learned:  # killed again with the bigger reservation: prefer lower rungs until unload
                        entry.skip_rungs |= policy.skip_rungs
                    try:  # on CPU: bf16 → int8 → 4-bit, the lighter rungs the planner prices
                        lower = self._choose(entry, facts, policy, options)
                    except InsufficientMemory:
                        self._event(
                            PoolEventKind.RETRY_LOWER, entry, failed_rung=rung, reason=killed or exc.message, **seen
                        )
                        again = (
                            "; the next request loads it again on that rung with the reservation it measured"
                            if learned
                            else ""
                        )
                        raise RunnerFailed(
                            f"{message}; no lower rung on the ladder fits or is allowed{again}"
                        ) from None
                    self._event(
                        PoolEventKind.RETRY_LOWER,
                        entry,
                        failed_rung=rung,
                        rung=lower.plan.rung,
                        reserved_bytes=lower.reserved_bytes,
                        reason=killed or exc.message,
                        **seen,
                    )
                    planned, need = self._record(entry, lower)
        except RunnerFailed as exc:
            entry.failures += 1
            self._set_state(entry, FAILED, exc.message)
            self._event(PoolEventKind.LOAD_FAILED, entry, reason=exc.message)
            raise
        except MemserveError as exc:
            self._set_state(entry, STOPPED, exc.message)
            self._event(PoolEventKind.REFUSED, entry, reason=exc.message, code=exc.code)
            raise

    async def _checked_options(
        self, entry: Entry, *, context_tokens: int | None, concurrency: int | None
    ) -> dict[str, int]:
        """The options of one ``load``, checked against the model and the planner's limits before anything changes."""
        options = load_options(entry.name, context_tokens=context_tokens, concurrency=concurrency)
        if options:
            facts = await asyncio.to_thread(self._read_facts, entry.config.source)
            validate_request(facts, request_for(entry.config, facts, options))
        return options

    def _choose(self, entry: Entry, facts: ModelFacts, policy: Policy, options: Mapping[str, int]) -> Choice:
        return self._placement.choose(entry.name, entry.config, facts, policy, options)

    def _record(self, entry: Entry, choice: Choice) -> tuple[Plan, dict[str, int]]:
        """Record why a load uses ``choice`` (its notes), now that it is used; its plan and reservation."""
        for kind, fields in choice.notes:
            self._event(kind, entry, **fields)
        return choice.plan, choice.reserved_bytes

    async def _admit(self, entry: Entry, need: dict[str, int]) -> None:
        """Reserve ``need`` in the ledger, evicting idle models or waiting for busy ones as needed."""
        deadline = self._clock.now() + self.settings.memory_wait_seconds
        while True:
            residents = [self._resident(e) for e in self.entries.values() if e.runner is not None and e is not entry]
            victims = choose_evictions(need, self.ledger.free_bytes(), residents)
            if victims == []:
                self.ledger.reserve(entry.name, need)
                return
            if victims:
                for victim in victims:
                    self._event(PoolEventKind.EVICT, self.entries[victim], reason=f"to make room for {entry.name}")
                await asyncio.gather(
                    *(
                        self._stop(
                            self.entries[v],
                            f"evicted to make room for {entry.name}",
                            cause="make_room",
                            deliberate=True,
                        )
                        for v in victims
                    )
                )
                continue
            pinned = [e.name for e in self.entries.values() if e.runner and e.config.pinned and e is not entry]
            self._placement.refuse_if_never(entry.name, need, pinned)
            remaining = deadline - self._clock.now()
            if remaining <= 0:
                holders = [
                    f"{e.name} ({e.state}, {e.leases} leases)"
                    for e in self.entries.values()
                    if e.runner is not None and e is not entry
                ]
                raise self._placement.busy(entry.name, need, holders, self.settings.memory_wait_seconds)
            await self._wait_change(remaining)

    async def _start_runner(self, entry: Entry, facts: ModelFacts, planned: Plan, need: dict[str, int]) -> None:
        started = self._clock.now()
        entry.plan, entry.reason, entry.watchdog_reason = planned, None, None
        entry.peak_bytes, entry.learned = {}, False
        entry.calibration_key = (fingerprint(facts), plan_key(planned))
        self._set_state(entry, STARTING)
        self._event(
            PoolEventKind.LOAD,
            entry,
            rung=planned.rung,
            reserved_bytes=need,
            planned_bytes=dict(planned.reserved_bytes),
            **({"after_failures": entry.failures} if entry.failures else {}),  # a restart
        )
        launch = PlanFile(
            facts.source,
            planned,
            reserved_bytes=dict(need),
            max_queue=entry.config.max_queue,
            adapters=tuple(entry.adapters.items()),
        )
        try:
            runner = await self._spawn(entry.name, launch, lambda ev: self._runner_event(entry, ev))
        except MemserveError:
            self.ledger.release(entry.name)
            raise
        except Exception as exc:  # the process could not be started at all (no interpreter, no room for a pipe)
            self.ledger.release(entry.name)
            raise RunnerFailed(f"runner {entry.name} could not be started: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.ledger.release(entry.name)
            raise
        entry.runner = runner
        self._spawn_task(self._watchdog.watch_runner(entry, runner), f"watchdog-{entry.name}")
        try:
            ready = await runner.wait_ready(self.settings.load_timeout_seconds)
        except BaseException as exc:
            if runner.returncode is not None:
                self._learn(entry)
            await self._stop(entry, str(exc), cause="load_failed")
            raise
        peak = peak_bytes(ready.memory) if ready is not None else {}
        raise_peak(peak, runner.sample_memory())
        raise_peak(entry.peak_bytes, peak)
        if entry.peak_bytes:
            self.calibration.put(*entry.calibration_key, entry.peak_bytes)
        await self._hold_warm_up_peak(entry)
        entry.load_seconds = round(self._clock.now() - started, 3)
        entry.last_used = entry.ready_at = self._clock.now()
        self._set_state(entry, READY)
        self._event(
            PoolEventKind.READY,
            entry,
            pid=runner.pid,
            load_seconds=entry.load_seconds,
            measured_bytes=peak,
            planned_bytes=dict(planned.reserved_bytes),
            peak_bytes=dict(entry.peak_bytes),
        )
        self._spawn_task(self._monitor(entry, runner), f"monitor-{entry.name}")
        if entry.waiting == 0:
            self._schedule_expiry(entry)

    async def _hold_warm_up_peak(self, entry: Entry) -> None:
        """Before any traffic, reserve what the warm-up really used when that is above the reservation.

        The runner's warm-up runs the worst case its plan admits and reports its peak (``peak_bytes``, or
        ``needs_bytes`` when even one sequence does not fit what it was given). Held at that peak, the
        books and the watchdog's limit are true from the first request. When the room is not there beside
        the other models, the runner is stopped and the load tried again with what it taught (``_learn``),
        so that admission evicts idle models or waits for busy ones first.
        """
        usable, reserved = self.ledger.usable_bytes(), self.ledger.reserved(entry.name)
        over = {d: v for d, v in entry.peak_bytes.items() if v > reserved.get(d, 0)}
        bigger = {d: min(v, usable.get(d, 0)) for d, v in {**reserved, **over}.items()}
        if bigger == reserved:
            return  # within its reservation, or it already holds all there is (the watchdog watches the rest)
        mine, held = self.ledger.held(entry.name), self.ledger.held_bytes()
        excess = {d: v - reserved.get(d, 0) for d, v in over.items()}
        why = f"its warm-up peaked at {sizes(over)}, {sizes(excess)} above its reservation"
        if all(v <= usable.get(d, 0) - (held.get(d, 0) - mine.get(d, 0)) for d, v in bigger.items()):
            self.ledger.raise_reservation(entry.name, bigger)
            self._event(PoolEventKind.RESERVE, entry, reserved_bytes=bigger, reason=why)
            return
        self._learn(entry)
        await self._stop(entry, f"{why}, with no room for that beside the other models", cause="retry")
        raise RunnerFailed(
            f"runner {entry.name} stopped before serving: {why}, with no room for that beside the "
            "other models; it is loaded again with the bigger reservation"
        )

    def _runner_event(self, entry: Entry, event: RunnerEvent) -> None:
        if not isinstance(event, PhaseDone | Ready):
            return
        raise_peak(entry.peak_bytes, peak_bytes(event.memory))  # phases report the runner's memory so far
        if not isinstance(event, PhaseDone):
            return
        for figures in (event.peak_bytes, event.needs_bytes):  # the worst-case warm-up's own figures
            raise_peak(entry.peak_bytes, figures or {})
        if entry.state.loading:
            self._set_state(entry, _PHASE_STATES.get(event.phase, entry.state))
            self._event(PoolEventKind.PHASE, entry, phase=event.phase, seconds=event.seconds)

    # ---------------------------------------------------------------------------------------------- stopping

    async def _stop(
        self, entry: Entry, reason: str, *, cause: str, state: ModelState = STOPPED, deliberate: bool = False
    ) -> None:
        """Stop the runner; ``deliberate`` stops (unload, eviction, expiry) also end a run of failures.

        ``cause`` is the ``stopped`` event's fixed word for why (``make_room``, ``keep_alive``, ``unload``,
        ``shutdown``: the evictions ``/metrics`` counts; ``load_failed``, ``retry``, ``crash``), where
        ``reason`` is the sentence for a person."""
        runner = entry.runner
        if runner is None:
            return
        if deliberate:
            entry.failures = 0
        entry.runner = None
        entry.cancel_expiry()
        if entry.state != FAILED:
            self._set_state(entry, DRAINING)
        await runner.stop()
        self.ledger.release(entry.name)
        if entry.state != FAILED:
            self._set_state(entry, state, reason)
            self._event(PoolEventKind.STOPPED, entry, reason=reason, cause=cause)
        self._notify()

    async def _monitor(self, entry: Entry, runner: RunnerHandle) -> None:
        """Waits for a ready runner's exit; an exit nobody asked for marks the model failed."""
        await runner.wait_exit()
        if entry.runner is not runner:
            return  # stopped on purpose
        reason = entry.watchdog_reason or runner.exit_reason()
        seen = {
            "measured_bytes": dict(entry.peak_bytes),
            "failed_reserved_bytes": dict(self.ledger.reserved(entry.name)),
        }
        stable = entry.ready_at is not None and self._clock.now() - entry.ready_at > _STABLE_SECONDS
        entry.failures = 1 if stable else entry.failures + 1
        rung = entry.plan.rung if entry.plan is not None else None
        if (
            self._learn(entry)
            and rung is not None
            and entry.config.policy.retry_lower
            and entry.rung_kills.get(rung, 0) >= _KILLS_BEFORE_LOWER
        ):
            entry.skip_rungs |= Policy().below(rung).skip_rungs  # killed again with the bigger reservation
            self._event(PoolEventKind.RETRY_LOWER, entry, failed_rung=rung, reason=reason, **seen)
        entry.watchdog_reason = None
        self._set_state(entry, FAILED, f"runner {entry.name} (pid {runner.pid}) {reason}")
        self._event(PoolEventKind.CRASH, entry, pid=runner.pid, reason=reason)
        await self._stop(entry, reason, cause="crash", state=FAILED)

    def _release(self, entry: Entry) -> None:
        entry.leases -= 1
        entry.last_used = self._clock.now()
        if entry.leases == 0 and entry.waiting == 0 and entry.state == READY:
            self._schedule_expiry(entry)
        self._notify()

    def _schedule_expiry(self, entry: Entry) -> None:
        entry.schedule_expiry(self._clock, lambda: self._spawn_task(self._expire(entry), f"expire-{entry.name}"))

    async def _expire(self, entry: Entry) -> None:
        if entry.state == READY and entry.leases == 0 and entry.waiting == 0 and entry.expires_at is not None:
            await self._stop(
                entry, f"idle for {entry.keep_alive_seconds:g} s (keep_alive)", cause="keep_alive", deliberate=True
            )

    # ---------------------------------------------------------------------------------------------- watchdog

    def _kill(self, entry: Entry, runner: RunnerHandle, reason: str, **fields: Any) -> None:
        entry.watchdog_reason = reason
        self._event(PoolEventKind.WATCHDOG_KILL, entry, pid=runner.pid, reason=reason, **fields)
        runner.kill()

    def _learn(self, entry: Entry) -> bool:
        """After a kill or a crash: record what the runner used past its reservation, with a margin. True if any.

        The figure is the highest of the watchdog's samples and the runner's own reports, with the watchdog's
        tolerance on top (``learned_bytes``). The calibration keeps it for this (checkpoint, plan) across
        restarts. Must run before ``_stop``, which forgets the reservation.
        """
        reserved = self.ledger.reserved(entry.name)
        learned = learned_bytes(
            entry.peak_bytes,
            reserved,
            tolerance=self.settings.watchdog_tolerance,
            tolerance_min_bytes=self.settings.watchdog_tolerance_min_bytes,
        )
        if not learned or entry.calibration_key is None or entry.plan is None or entry.learned:
            return False
        self.calibration.put(*entry.calibration_key, learned)
        rung = entry.plan.rung
        entry.rung_kills[rung] = entry.rung_kills.get(rung, 0) + 1
        entry.learned = True
        over = {d: v for d, v in entry.peak_bytes.items() if d in learned}
        self._event(
            PoolEventKind.LEARNED,
            entry,
            rung=rung,
            measured_bytes=over,
            reserved_bytes=reserved,
            next_reserved_bytes=learned,
        )
        return True

    def _forget_failures(self, entry: Entry) -> None:
        entry.failures, entry.skip_rungs, entry.rung_kills = 0, frozenset(), {}

    # ---------------------------------------------------------------------------------------------- helpers

    def _resident(self, entry: Entry) -> Resident:
        return Resident(
            entry.name,
            entry.state,
            self.ledger.held(entry.name),
            entry.leases + entry.waiting,
            entry.last_used,
            entry.config.pinned,
            entry.load_seconds or 0.0,
        )

    def _set_state(self, entry: Entry, state: ModelState, reason: str | None = None) -> None:
        entry.state = state
        if reason is not None:
            entry.reason = reason
        self._notify()

    def _event(self, kind: PoolEventKind, entry: Entry, **fields: Any) -> None:
        self.history.add(kind, entry.name, fields)

    def _notify(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def _wait_change(self, timeout: float | None) -> None:
        await wait_event(self._clock, self._change, timeout)

    def _spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _both(overrides: Mapping[str, int]) -> dict[str, int | None]:
    return {"context_tokens": overrides.get("context_tokens"), "concurrency": overrides.get("concurrency")}


__all__ = ["Entry", "Lease", "ModelPool", "ModelState", "backoff_seconds", "compatible", "watchdog_limit_bytes"]


def _runner_refused(answer: httpx.Response, who: str) -> MemserveError:
    """A runner's error answer as the same error from the gateway: its status, type, code, param and message."""
    try:
        error = answer.json()["error"]
        refused = MemserveError(str(error["message"]), param=error.get("param"), code=error.get("code"))
        refused.error_type = str(error.get("type") or error_type_for(answer.status_code))
        refused.status_code = answer.status_code
    except (ValueError, KeyError, TypeError, AttributeError):
        refused = BadUpstream(f"{who} answered {answer.status_code} without an OpenAI error: {answer.text[:200]!r}")
    return refused
