"""What each loaded model holds per device, and what was measured last time for the same model and plan.

The :class:`Ledger` is the pool's book of memory: for each model and device it keeps the bytes the
plan reserved and the bytes last measured (the runner's own report and the pool's sampling), and
counts the larger of the two as *held*. A runner that grows past its plan is counted at its real
size at once; one that stays under it keeps its reservation, because its peak may still come (on
CPU, mapped weights fault in on the first forwards). The headroom of each device is never handed out.

:class:`Calibration` persists measured peaks under the data directory, keyed by a checkpoint
fingerprint (names, sizes and mtimes of its files) and a plan key (the plan fields that change
memory), so that the next load of the same thing reserves what it really used (:func:`calibrated`).
A peak is a high-water mark: a later, smaller measurement (a warm-up that did not reach what real
traffic reached) never lowers it, because a runner reserved below what it was once seen to use is
killed again by the first request that takes it there. The pool also records what it learns from a
watchdog kill or a crash here (the peak seen, plus a margin), so the next load of that plan reserves it.
The file is JSON, written atomically; a missing or unreadable file is an empty calibration, never a
crash: calibration only sharpens estimates, so losing it costs accuracy, not service.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memserve.errors import InvalidArgument
from memserve.memory.planner import Plan

log = logging.getLogger(__name__)

ANY_DEVICE = "*"  # a headroom under this key applies to every device without its own entry
CALIBRATION_VERSION = 1
# the Plan.to_json fields that change how much memory a runner uses
PLAN_MEMORY_FIELDS = (
    "rung",
    "dtype",
    "quantization",
    "context_tokens",
    "concurrency",
    "max_batch_tokens",
    "device_map",
)


def _check_sizes(sizes: Mapping[str, int], *, what: str) -> dict[str, int]:
    """A copy of a per-device byte mapping; negative or non-integer sizes are a caller's mistake."""
    for device, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"{what} for {device} must be a non-negative number of bytes, got {size!r}")
    return dict(sizes)


class Ledger:
    """Per device: reserved bytes (the plan) and measured bytes (runner report and pool sampling) for each model.

    Admission uses the larger of the two; headroom is never handed out. Devices are those given a
    capacity; a model that reserves or measures bytes on any other device is still counted, on a
    device with no capacity (so nothing more fits there).
    """

    def __init__(self, capacity_bytes: Mapping[str, int], headroom_bytes: Mapping[str, int]) -> None:
        """``capacity_bytes``: the most memserve may use per device (a budget, or free memory at start).

        ``headroom_bytes`` is subtracted from it; a ``"*"`` entry (as ``--memory``-style parsing
        returns for a bare size) applies to every device without its own entry.
        """
        self._capacity = _check_sizes(capacity_bytes, what="capacity")
        headroom = _check_sizes(headroom_bytes, what="headroom")
        unknown = sorted(set(headroom) - set(self._capacity) - {ANY_DEVICE})
        if unknown:
            raise InvalidArgument(
                f"headroom given for {', '.join(unknown)}, which has no capacity; "
                f"known devices: {', '.join(sorted(self._capacity)) or 'none'}"
            )
        default = headroom.get(ANY_DEVICE, 0)
        self._headroom = {device: headroom.get(device, default) for device in self._capacity}
        self._reserved: dict[str, dict[str, int]] = {}
        self._measured: dict[str, dict[str, int] | None] = {}

    # ------------------------------------------------------------------------------- bookkeeping

    def reserve(self, name: str, reserved_bytes: Mapping[str, int]) -> None:
        """A load of ``name`` is admitted with its plan's bytes.

        Replaces any earlier reservation and forgets earlier samples: a new load (a retry one rung
        lower, say) starts from its own plan, not from what the previous runner measured.
        """
        self._reserved[name] = _check_sizes(reserved_bytes, what=f"reserved bytes of {name}")
        self._measured[name] = None

    def measure(self, name: str, measured_bytes: Mapping[str, int]) -> None:
        """The latest memory sample of ``name``; it replaces the previous one (a device left out is 0).

        A sample for a model that holds no reservation (it arrived after ``release``) is dropped, so
        a late sample cannot bring a stopped runner's bytes back into the books.
        """
        sample = _check_sizes(measured_bytes, what=f"measured bytes of {name}")
        if name not in self._reserved:
            log.debug("dropped a memory sample for %s: it holds no reservation (already released?)", name)
            return
        self._measured[name] = sample

    def raise_reservation(self, name: str, reserved_bytes: Mapping[str, int]) -> None:
        """The same runner of ``name`` now reserves ``reserved_bytes`` (its warm-up peaked above its plan).

        Unlike :meth:`reserve` its samples stay: the runner is the same one, and so is what it was seen to use.
        """
        if name not in self._reserved:
            raise InvalidArgument(f"{name} holds no reservation to raise; reserve it first")
        self._reserved[name] = _check_sizes(reserved_bytes, what=f"reserved bytes of {name}")

    def release(self, name: str) -> None:
        """The runner of ``name`` stopped: everything it held is free again. Releasing twice is harmless."""
        self._reserved.pop(name, None)
        self._measured.pop(name, None)

    # ---------------------------------------------------------------------------------- queries

    def names(self) -> list[str]:
        """The models holding memory, sorted."""
        return sorted(self._reserved)

    def reserved(self, name: str) -> dict[str, int]:
        """What ``name``'s plan reserves per device; ``{}`` for a model that holds nothing."""
        return dict(self._reserved.get(name, {}))

    def measured(self, name: str) -> dict[str, int]:
        """``name``'s latest sample per device; ``{}`` before its first sample or when it holds nothing."""
        return dict(self._measured.get(name) or {})

    def held(self, name: str) -> dict[str, int]:
        """``max(reserved, measured)`` per device; ``{}`` for a model that holds nothing."""
        reserved = self._reserved.get(name, {})
        measured = self._measured.get(name) or {}
        return {device: max(reserved.get(device, 0), measured.get(device, 0)) for device in {*reserved, *measured}}

    def usable_bytes(self) -> dict[str, int]:
        """Capacity less headroom per device (never below 0)."""
        return {device: max(0, cap - self._headroom[device]) for device, cap in self._capacity.items()}

    def held_bytes(self) -> dict[str, int]:
        """Everything held per device, over all models; includes devices without a capacity."""
        total = dict.fromkeys(self._capacity, 0)
        for name in self._reserved:
            for device, size in self.held(name).items():
                total[device] = total.get(device, 0) + size
        return total

    def free_bytes(self) -> dict[str, int]:
        """Usable less held per device, clamped at 0.

        Held can exceed usable when a runner measures above its plan (the watchdog's business); the
        overshoot shows in :meth:`to_json` as ``held_bytes`` > ``usable_bytes``, while ``free_bytes``
        stays 0 so that nothing more is admitted there. Devices without a capacity have 0 free.
        """
        usable = self.usable_bytes()
        return {device: max(0, usable.get(device, 0) - held) for device, held in self.held_bytes().items()}

    def to_json(self) -> dict[str, Any]:
        """The ``/api/memory`` view; ``measured_bytes`` is null until the model's first sample."""
        usable = self.usable_bytes()
        held = self.held_bytes()
        free = self.free_bytes()
        devices = {
            device: {
                "capacity_bytes": self._capacity.get(device, 0),
                "headroom_bytes": self._headroom.get(device, 0),
                "usable_bytes": usable.get(device, 0),
                "held_bytes": held[device],
                "free_bytes": free[device],
            }
            for device in sorted(held)
        }
        models: dict[str, dict[str, dict[str, int | None]]] = {}
        for name in self.names():
            reserved = self._reserved[name]
            measured = self._measured[name]
            models[name] = {
                device: {
                    "reserved_bytes": reserved.get(device, 0),
                    "measured_bytes": None if measured is None else measured.get(device, 0),
                    "held_bytes": size,
                }
                for device, size in sorted(self.held(name).items())
            }
        return {"devices": devices, "models": models}


# ------------------------------------------------------------------------------------ calibration


def _sha16(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_fingerprint(source_dir_or_id: str, files: Sequence[tuple[str, int, float]]) -> str:
    """sha256 hex[:16] of the source and the (name, size, mtime) of each weight and config file.

    Cheap (no file is read) and changes when any file is replaced, re-downloaded or touched; the
    order of ``files`` does not matter.
    """
    listing = sorted([str(name), int(size), float(mtime)] for name, size, mtime in files)
    return _sha16({"source": source_dir_or_id, "files": listing})


def checkpoint_files(folder: Path) -> list[tuple[str, int, float]]:
    """The (name, size, mtime) of the weight and config files in a model folder, for the fingerprint.

    Follows symlinks, so a Hugging Face cache snapshot is fingerprinted by its blobs.
    """
    patterns = ("*.safetensors", "*.bin", "*.json")
    found: list[tuple[str, int, float]] = []
    for path in sorted({p for pattern in patterns for p in folder.glob(pattern)}):
        stat = path.stat()
        found.append((path.name, stat.st_size, stat.st_mtime))
    return found


def plan_key(plan: Plan) -> str:
    """sha256 hex[:16] of the plan fields that change memory (``PLAN_MEMORY_FIELDS``), as sorted JSON.

    Anything else in the plan (the per-device estimates, notes) may change between versions of the
    estimator without invalidating what was measured.
    """
    plan_json = plan.to_json()
    return _sha16({field: plan_json[field] for field in PLAN_MEMORY_FIELDS})


def calibrated(plan_devices_bytes: Mapping[str, int], measured: Mapping[str, int] | None) -> dict[str, int]:
    """The bytes to reserve next time: the measured peak per device where there is one, else the plan's.

    A device that was measured but not planned (the host RAM a GPU runner really used) is reserved too.
    """
    return {**plan_devices_bytes, **(measured or {})}


class Calibration:
    """Measured peak bytes per device (high-water marks), keyed by (checkpoint fingerprint, plan key), in one file.

    The file holds ``{"version": 1, "peaks": {fingerprint: {plan_key: {device: bytes}}}}``. It is read
    once; every ``put`` rewrites it whole through a temporary file and ``os.replace``, so a reader (or
    a crash) never sees half a file.
    """

    def __init__(self, path: Path) -> None:
        """``path``: e.g. ``data_dir / "calibration.json"``. Missing = empty; corrupt = empty plus a warning."""
        self.path = path
        self._peaks: dict[str, dict[str, dict[str, int]]] = self._read()

    def get(self, fingerprint: str, plan_key: str) -> dict[str, int] | None:
        """The measured peak bytes per device, or None when this checkpoint never ran with this plan."""
        peak = self._peaks.get(fingerprint, {}).get(plan_key)
        return dict(peak) if peak is not None else None

    def put(self, fingerprint: str, plan_key: str, peak_bytes: Mapping[str, int]) -> None:
        """Record a measured peak, per device the larger of it and the one recorded before, and write the file.

        A failed write (read-only or full disk) is logged as a warning and the value is kept for this
        process: the next load still benefits, only persistence across restarts is lost.
        """
        peak = _check_sizes(peak_bytes, what="peak bytes")
        before = self._peaks.setdefault(fingerprint, {}).get(plan_key, {})
        merged = {device: max(before.get(device, 0), peak.get(device, 0)) for device in {*before, *peak}}
        if merged == before:
            return  # nothing new: no write
        self._peaks[fingerprint][plan_key] = merged
        try:
            self._write()
        except OSError as exc:
            log.warning(
                "could not save memory calibration to %s (%s); it is kept in memory until restart", self.path, exc
            )

    def _read(self) -> dict[str, dict[str, dict[str, int]]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read memory calibration %s (%s); starting without it", self.path, exc)
            return {}
        try:
            data = json.loads(raw)
            return _parse_peaks(data)
        except (ValueError, TypeError) as exc:
            log.warning(
                "memory calibration %s is corrupt (%s); ignoring it, it will be rewritten on the next measurement",
                self.path,
                exc,
            )
            return {}

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": CALIBRATION_VERSION, "peaks": self._peaks}, sort_keys=True, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _parse_peaks(data: Any) -> dict[str, dict[str, dict[str, int]]]:
    """Validate the file's shape; raises ValueError (or TypeError) on anything unexpected."""
    if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"expected an object with version {CALIBRATION_VERSION}")
    peaks = data.get("peaks")
    if not isinstance(peaks, dict):
        raise ValueError("expected a 'peaks' object")
    for fingerprint, plans in peaks.items():
        if not isinstance(plans, dict):
            raise ValueError(f"peaks for {fingerprint} are not an object")
        for key, peak in plans.items():
            if not isinstance(peak, dict):
                raise ValueError(f"peak for {fingerprint}/{key} is not an object")
            for device, size in peak.items():
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise ValueError(f"peak for {fingerprint}/{key} on {device} is not a byte count: {size!r}")
    return peaks
