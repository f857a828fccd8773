"""Build an Inventory from the real host: RAM under cgroup limits, GPUs through NVML.

psutil reads /proc/meminfo, which shows the *host's* memory: inside a container or a systemd slice the
kernel kills us long before that is used up, so RAM is the smallest of physical memory and every
cgroup limit above us. GPUs come from NVML (``pynvml``, from the nvidia-ml-py package), which needs no
CUDA context; torch is never imported here, so the gateway can probe without touching a GPU.

Every read of the world is a parameter (``virtual_memory``, ``nvml``, ``cgroup``, the cgroup paths), so
tests simulate any host without one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil

from memserve.errors import InvalidArgument
from memserve.memory.inventory import Device, Inventory
from memserve.units import format_bytes, parse_bytes, parse_device_sizes

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HEADROOM_BYTES",
    "CgroupMemory",
    "GpuProcessMemory",
    "available_ram_bytes",
    "bitsandbytes_available",
    "cgroup_memory",
    "cpu_device",
    "cuda_devices",
    "probe_inventory",
]

# Never handed out to a plan, per device unless --headroom says otherwise. On cpu it leaves room for
# the OS, the page cache that keeps mapped weights readable, and the gateway itself; on a GPU for the
# allocator's fragmentation and the slack between a runner's estimate and its measured peak.
DEFAULT_HEADROOM_BYTES = 512 * 1024**2

# cgroup v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712); no real limit
# is anywhere near 2**60 bytes (1 EiB).
_UNLIMITED_BYTES = 2**60


@dataclass(frozen=True)
class CgroupMemory:
    """The memory cgroup this process lives in, as far as it could be read.

    ``path`` is the process's cgroup as listed in /proc/self/cgroup. ``limit_bytes`` is the smallest
    limit on it or any ancestor (None: no limit or unreadable); ``usage_bytes`` and
    ``inactive_file_bytes`` come from the cgroup whose limit binds, so ``limit - (usage - inactive)``
    is the room left there. Inactive file pages (page cache) are reclaimed before the OOM killer runs.
    """

    version: int
    path: str
    limit_bytes: int | None
    usage_bytes: int | None
    inactive_file_bytes: int


@dataclass(frozen=True)
class _Hierarchy:
    """One cgroup filesystem's file names: v1's memory controller and v2 name the same things apart."""

    version: int
    limit_file: str
    usage_file: str
    inactive_keys: tuple[str, ...]


_V1 = _Hierarchy(1, "memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file"))
_V2 = _Hierarchy(2, "memory.max", "memory.current", ("inactive_file",))


def _read_bytes(path: Path) -> int | None:
    """A limit or usage file as bytes; None for "max", v1's huge no-limit value, or anything unreadable."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value < 0 or value >= _UNLIMITED_BYTES else value


def _read_stat(path: Path, keys: tuple[str, ...]) -> int:
    """The first of ``keys`` found in a memory.stat file; 0 (nothing reclaimable known) otherwise."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    stats: dict[str, int] = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stats[key] = int(value)
    return next((stats[key] for key in keys if key in stats), 0)


def _read_cgroup(hierarchy: _Hierarchy, base: Path, path: str) -> CgroupMemory | None:
    """Read one hierarchy mounted at ``base``; None when none of its memory files can be read.

    A container usually mounts its own cgroup at the root while /proc/self/cgroup still shows the
    host's path, so a path that is not there falls back to ``base``. Every ancestor up to ``base`` is
    walked because a parent's limit binds its children too.
    """
    own = base / path.strip("/")
    if not own.is_dir():
        own = base
    levels = [own, *(p for p in own.parents if p.is_relative_to(base))]
    limits: list[tuple[int, Path]] = []
    for level in levels:
        limit = _read_bytes(level / hierarchy.limit_file)
        if limit is not None:
            limits.append((limit, level))
    usage = _read_bytes(own / hierarchy.usage_file)
    if not limits and usage is None:
        return None
    if not limits:
        inactive = _read_stat(own / "memory.stat", hierarchy.inactive_keys)
        return CgroupMemory(hierarchy.version, path, None, usage, inactive)
    limit, binding = min(limits, key=lambda pair: pair[0])
    return CgroupMemory(
        version=hierarchy.version,
        path=path,
        limit_bytes=limit,
        usage_bytes=_read_bytes(binding / hierarchy.usage_file),
        inactive_file_bytes=_read_stat(binding / "memory.stat", hierarchy.inactive_keys),
    )


def cgroup_memory(
    proc_self_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> CgroupMemory | None:
    """The memory cgroup limiting this process, or None when there is none or nothing can be read.

    On hybrid hosts (a v1 ``memory`` controller line and a v2 ``0::`` line) the memory controller is
    attached to v1, so v1 is preferred when it has a limit; v2 is then only consulted for its limit.
    Missing or unreadable files mean "unknown", never an error.
    """
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    v1_path = v2_path = None
    for line in lines:
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    v1 = _read_cgroup(_V1, cgroup_root / "memory", v1_path) if v1_path is not None else None
    if v1 is not None and v1.limit_bytes is not None:
        return v1
    v2 = None
    if v2_path is not None:
        # hybrid hosts mount the v2 tree at <root>/unified, next to the v1 controllers
        unified = cgroup_root / "unified"
        v2_root = unified if (unified / "cgroup.controllers").exists() else cgroup_root
        v2 = _read_cgroup(_V2, v2_root, v2_path)
    if v2 is not None and v2.limit_bytes is not None:
        return v2
    return v1 or v2


class _MemoryStats(Protocol):
    """The two fields of ``psutil.virtual_memory()`` that matter here."""

    @property
    def total(self) -> int: ...

    @property
    def available(self) -> int: ...


def cpu_device(
    *,
    budget_bytes: int | None,
    headroom_bytes: int,
    virtual_memory: Callable[[], _MemoryStats] = psutil.virtual_memory,
    cgroup: CgroupMemory | None,
) -> Device:
    """Host RAM as the planner should see it: capped by the cgroup limit, free as the cgroup counts it.

    The cgroup's free room is ``limit - (usage - inactive_file)``: page cache that is inactive is
    reclaimed before the OOM killer runs, so it counts as free (the way kubelet computes its working set).
    """
    stats = virtual_memory()
    total_bytes, free_bytes = int(stats.total), int(stats.available)
    description = f"RAM {format_bytes(total_bytes)}"
    limit = cgroup.limit_bytes if cgroup is not None else None
    if cgroup is not None and limit is not None:
        working_set = 0 if cgroup.usage_bytes is None else max(0, cgroup.usage_bytes - cgroup.inactive_file_bytes)
        free_bytes = min(free_bytes, limit - working_set)
        if limit < total_bytes:
            description = f"cgroup v{cgroup.version} limit {format_bytes(limit)} (host RAM {format_bytes(total_bytes)})"
            total_bytes = limit
    return Device(
        name="cpu",
        kind="cpu",
        total_bytes=total_bytes,
        free_bytes=max(0, free_bytes),
        budget_bytes=budget_bytes,
        headroom_bytes=headroom_bytes,
        description=description,
    )


@dataclass(frozen=True)
class HostMemory:
    """Host RAM as this process can use it: the smaller of physical memory and our cgroup's limit, and what of
    it can still be taken now. The one reading of host memory: the watchdog's floor and ``/api/memory`` alike."""

    total_bytes: int
    available_bytes: int

    def to_json(self) -> dict[str, int]:
        return {"total_bytes": self.total_bytes, "available_bytes": self.available_bytes}


def host_memory(
    *,
    virtual_memory: Callable[[], _MemoryStats] = psutil.virtual_memory,
    cgroup: Callable[[], CgroupMemory | None] = cgroup_memory,
) -> HostMemory:
    """Host RAM now, cgroup-aware (``cpu_device``): psutil alone shows the host's, not the container's."""
    device = cpu_device(budget_bytes=None, headroom_bytes=0, virtual_memory=virtual_memory, cgroup=cgroup())
    return HostMemory(device.total_bytes, device.free_bytes)


def available_ram_bytes(
    *,
    virtual_memory: Callable[[], _MemoryStats] = psutil.virtual_memory,
    cgroup: Callable[[], CgroupMemory | None] = cgroup_memory,
) -> int:
    """RAM that can still be taken now: the host's available memory, or the room left under our cgroup's
    limit when that is smaller. A container's OOM killer acts at its cgroup limit, however much the host
    has free, so the watchdog's host floor is measured here."""
    return host_memory(virtual_memory=virtual_memory, cgroup=cgroup).available_bytes


def _text(value: str | bytes) -> str:
    """Older nvidia-ml-py releases return bytes for names and UUIDs."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _import_nvml() -> Any | None:
    """The ``pynvml`` module (nvidia-ml-py), or None where it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _hides_every_gpu(visible: str | None) -> bool:
    return visible is not None and visible.strip() in ("", "-1")


def _visible_indices(nvml: Any, count: int, visible: str | None) -> tuple[list[int], list[str]]:
    """NVML indices of the GPUs CUDA will number 0..k-1, following CUDA_VISIBLE_DEVICES.

    Like CUDA, the list ends at the first entry that names no GPU; UUID entries (``GPU-…``, a unique
    prefix is enough) are matched through NVML, MIG entries end the list because a MIG slice's memory
    is not the whole GPU's.
    """
    if visible is None:
        return list(range(count)), []
    indices: list[int] = []
    uuids: list[str] | None = None
    for raw in visible.split(","):
        entry = raw.strip()
        index: int | None = None
        if entry.lstrip("-").isdigit():
            number = int(entry)
            index = number if 0 <= number < count else None
        elif entry.startswith("GPU-"):
            if uuids is None:
                uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
            matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(entry)]
            index = matches[0] if len(matches) == 1 else None
        if index is None:
            note = (
                f"CUDA_VISIBLE_DEVICES={visible!r}: entry {entry!r} names no whole GPU NVML can see "
                f"({count} found); it and the entries after it are ignored, as CUDA does"
            )
            return indices, [note]
        if index in indices:
            return indices, [f"CUDA_VISIBLE_DEVICES={visible!r} lists GPU {entry} twice; using the first"]
        indices.append(index)
    return indices, []


def cuda_devices(nvml: Any | None = None) -> tuple[list[Device], list[str]]:
    """The CUDA GPUs this process may use, read through NVML, with notes on anything that went wrong.

    ``nvml`` is the ``pynvml`` module, or a fake with the same functions in tests. No GPU, no driver or
    no nvidia-ml-py is not an error: the host is simply CPU-only, and a note says why.
    ``cuda:N`` follows NVML's order (PCI bus id), which is CUDA's order only with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or identical GPUs.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if _hides_every_gpu(visible):
        return [], [f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"]
    if nvml is None:
        nvml = _import_nvml()
        if nvml is None:
            return [], [
                "GPUs not probed: nvidia-ml-py is not installed (pip install 'memserve[gpu]' on a host "
                "with an NVIDIA GPU)"
            ]
    nvml_error: type[BaseException] = getattr(nvml, "NVMLError", Exception)
    try:
        nvml.nvmlInit()
    except (nvml_error, OSError) as exc:
        return [], [f"no NVIDIA GPU found (NVML: {str(exc) or type(exc).__name__})"]
    devices: list[Device] = []
    notes: list[str] = []
    try:
        indices, notes = _visible_indices(nvml, int(nvml.nvmlDeviceGetCount()), visible)
        for cuda_index, nvml_index in enumerate(indices):
            name = f"cuda:{cuda_index}"
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpu_name = _text(nvml.nvmlDeviceGetName(handle))
            except nvml_error as exc:
                notes.append(f"{name} (NVML index {nvml_index}) skipped: NVML could not read it ({exc})")
                continue
            try:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability: tuple[int, int] | None = (int(major), int(minor))
            except (nvml_error, AttributeError):
                capability = None
            devices.append(
                Device(
                    name=name,
                    kind="cuda",
                    total_bytes=int(info.total),
                    free_bytes=int(info.free),
                    used_by_others_bytes=int(info.used),
                    description=gpu_name,
                    compute_capability=capability,
                )
            )
    except nvml_error as exc:
        notes.append(f"GPU probe stopped early (NVML: {exc})")
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml_error as exc:
            notes.append(f"NVML shutdown failed ({exc}); the GPU readings above are still valid")
    mixed = len({d.description for d in devices}) > 1
    if mixed and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        notes.append(
            "GPUs of different models: cuda:N here follows the PCI bus order; "
            "set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA numbers them the same way"
        )
    return devices, notes


class GpuProcessMemory:
    """GPU memory held by given processes, per ``cuda:N`` (numbered as :func:`cuda_devices` does).

    The watchdog's per-runner GPU reading: NVML's list of compute processes on each visible GPU, summed
    over a runner's process tree. NVML counts what the driver gave the process (the CUDA context and
    everything torch's caching allocator holds), which is what other processes cannot have.
    NVML is opened on the first call and kept open. A host without NVML, or a GPU NVML cannot read,
    gives no reading (``{}`` or fewer devices): the runner's own report still stands. NVML lists host
    PIDs; inside a container with its own PID namespace they match nothing, and nothing is read.
    """

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml
        self._handles: list[tuple[str, Any]] | None = None

    def __call__(self, pids: Collection[int]) -> dict[str, int]:
        """Bytes per GPU where any of ``pids`` holds memory; GPUs none of them uses are left out."""
        handles = self._open()
        if not handles or not pids:
            return {}
        nvml: Any = self._nvml  # set by _open whenever it found GPUs
        nvml_error: type[BaseException] = getattr(nvml, "NVMLError", Exception)
        wanted = set(pids)
        used: dict[str, int] = {}
        for name, handle in handles:
            try:
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml_error:
                continue
            ours = [p for p in processes if p.pid in wanted]
            if ours:  # usedGpuMemory is None where the driver cannot tell (e.g. some vGPU setups)
                used[name] = sum(int(p.usedGpuMemory or 0) for p in ours)
        return used

    def _open(self) -> list[tuple[str, Any]]:
        if self._handles is not None:
            return self._handles
        self._handles = []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if _hides_every_gpu(visible):
            return self._handles
        nvml = self._nvml = self._nvml or _import_nvml()
        if nvml is None:
            return self._handles
        nvml_error: type[BaseException] = getattr(nvml, "NVMLError", Exception)
        try:
            nvml.nvmlInit()
            indices, _ = _visible_indices(nvml, int(nvml.nvmlDeviceGetCount()), visible)
            self._handles = [(f"cuda:{i}", nvml.nvmlDeviceGetHandleByIndex(n)) for i, n in enumerate(indices)]
        except (nvml_error, OSError) as exc:
            log.info("GPU memory per runner is not sampled: NVML unavailable (%s)", exc)
        return self._handles


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes is installed, without importing it (slow, and it may initialise CUDA)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _device_sizes(value: str | Mapping[str, int] | None, what: str) -> dict[str, int]:
    """A ``--memory``/``--headroom`` value, from the flag's text or an already parsed mapping."""
    if value is None:
        return {}
    if isinstance(value, str):
        return parse_device_sizes(value, what=what)
    return {key.strip().lower(): parse_bytes(size, what=f"{what} size for {key}") for key, size in value.items()}


def probe_inventory(
    *,
    memory: str | Mapping[str, int] | None = None,
    headroom: str | Mapping[str, int] | None = None,
    nvml: Any | None = None,
    cgroup: CgroupMemory | Literal["probe"] | None = "probe",
    virtual_memory: Callable[[], _MemoryStats] = psutil.virtual_memory,
) -> Inventory:
    """Probe the host and apply the ``--memory`` budget and ``--headroom`` (same syntax; ``*`` = every
    device). A per-device value wins over ``*``; headroom defaults to DEFAULT_HEADROOM_BYTES.

    A budget or headroom for a device that is not there is an InvalidArgument (a typo should not
    silently leave a GPU unbudgeted); a budget above a device's capacity is capped, with a note.
    """
    budgets = _device_sizes(memory, "--memory")
    headrooms = _device_sizes(headroom, "--headroom")
    gpus, notes = cuda_devices(nvml)
    found = ["cpu", *(gpu.name for gpu in gpus)]
    for flag, sizes in (("memory", budgets), ("headroom", headrooms)):
        unknown = sorted(set(sizes) - {"*", *found})
        if unknown:
            gpu_hint = f" ({'; '.join(notes)})" if notes and not gpus else ""
            raise InvalidArgument(
                f"--{flag} names {', '.join(unknown)}, but this host has only {', '.join(found)}{gpu_hint}; "
                f"use one of those names, or a bare size for every device",
                param=flag,
            )

    def settings(name: str) -> tuple[int | None, int]:
        """(budget, headroom) for one device: its own value, else the ``*`` value, else the default."""
        budget = budgets.get(name, budgets.get("*"))
        return budget, headrooms.get(name, headrooms.get("*", DEFAULT_HEADROOM_BYTES))

    cpu_budget, cpu_headroom = settings("cpu")
    cgroup_info = cgroup_memory() if cgroup == "probe" else cgroup
    cpu = cpu_device(
        budget_bytes=cpu_budget,
        headroom_bytes=cpu_headroom,
        virtual_memory=virtual_memory,
        cgroup=cgroup_info,
    )
    devices: list[Device] = []
    for device in (cpu, *gpus):
        budget, room = settings(device.name)
        if budget is not None and budget > device.total_bytes:
            notes.append(
                f"--memory {device.name}={format_bytes(budget)} is more than the device has "
                f"({format_bytes(device.total_bytes)}); using {format_bytes(device.total_bytes)}"
            )
            budget = device.total_bytes
        if room >= (device.total_bytes if budget is None else budget):
            notes.append(f"--headroom {device.name}={format_bytes(room)} leaves nothing usable there")
        devices.append(replace(device, budget_bytes=budget, headroom_bytes=room))
    return Inventory(
        devices=tuple(devices),
        bitsandbytes=bool(gpus) and bitsandbytes_available(),
        notes=tuple(notes),
    )
