"""Probing RAM (cgroups v1/v2) and GPUs (NVML) on simulated hosts: fake cgroup trees and a fake NVML."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest

from memserve.errors import InvalidArgument
from memserve.memory import probe
from memserve.memory.inventory import Inventory
from memserve.memory.probe import (
    DEFAULT_HEADROOM_BYTES,
    CgroupMemory,
    GpuProcessMemory,
    HostMemory,
    available_ram_bytes,
    cgroup_memory,
    cpu_device,
    cuda_devices,
    host_memory,
    probe_inventory,
)

GiB = 1024**3
MiB = 1024**2
V1_UNLIMITED = "9223372036854771712"


class VirtualMemory(NamedTuple):
    """The two fields of psutil.virtual_memory() the probe reads."""

    total: int
    available: int


def host_24g() -> VirtualMemory:
    return VirtualMemory(total=24 * GiB, available=20 * GiB)


@pytest.fixture(autouse=True)
def _plain_cuda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own CUDA_VISIBLE_DEVICES must not change what these tests see."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def make_host(tmp_path: Path, proc_cgroup: str | None, files: dict[str, str]) -> tuple[Path, Path]:
    """Write a fake /proc/self/cgroup and a fake /sys/fs/cgroup tree; return both paths."""
    proc = tmp_path / "proc_self_cgroup"
    if proc_cgroup is not None:
        proc.write_text(proc_cgroup)
    root = tmp_path / "cgroup"
    root.mkdir()
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return proc, root


def stat(**values: int) -> str:
    return "\n".join(f"{key} {value}" for key, value in values.items())


# --- cgroup v2 ----------------------------------------------------------------------------------


def test_v2_limit_caps_ram_and_counts_inactive_file_as_free(tmp_path: Path) -> None:
    proc, root = make_host(
        tmp_path,
        "0::/user.slice/app\n",
        {
            "user.slice/app/memory.max": str(8 * GiB),
            "user.slice/app/memory.current": str(3 * GiB),
            "user.slice/app/memory.stat": stat(anon=2 * GiB, active_file=0, inactive_file=1 * GiB),
        },
    )
    cgroup = cgroup_memory(proc, root)
    assert cgroup == CgroupMemory(
        version=2, path="/user.slice/app", limit_bytes=8 * GiB, usage_bytes=3 * GiB, inactive_file_bytes=GiB
    )

    cpu = cpu_device(budget_bytes=None, headroom_bytes=0, virtual_memory=host_24g, cgroup=cgroup)
    assert cpu.name == "cpu" and cpu.kind == "cpu"
    assert cpu.total_bytes == 8 * GiB
    assert cpu.free_bytes == 8 * GiB - (3 * GiB - 1 * GiB)
    assert cpu.description == "cgroup v2 limit 8.0 GiB (host RAM 24.0 GiB)"


def test_available_ram_is_the_room_under_a_binding_cgroup_limit_else_the_hosts() -> None:
    """What the watchdog's host floor reads: a container is OOM-killed at its limit, not at the host's."""
    tight = CgroupMemory(version=2, path="/app", limit_bytes=8 * GiB, usage_bytes=7 * GiB, inactive_file_bytes=GiB)
    assert available_ram_bytes(virtual_memory=host_24g, cgroup=lambda: tight) == 2 * GiB
    loose = CgroupMemory(version=2, path="/app", limit_bytes=64 * GiB, usage_bytes=GiB, inactive_file_bytes=0)
    assert available_ram_bytes(virtual_memory=host_24g, cgroup=lambda: loose) == 20 * GiB
    assert available_ram_bytes(virtual_memory=host_24g, cgroup=lambda: None) == 20 * GiB


def test_host_memory_is_the_one_cgroup_aware_reading_for_the_watchdog_and_api_memory() -> None:
    """Inside a container ``/api/memory`` shows the container's total and room, as the watchdog reads them."""
    tight = CgroupMemory(version=2, path="/app", limit_bytes=8 * GiB, usage_bytes=7 * GiB, inactive_file_bytes=GiB)
    assert host_memory(virtual_memory=host_24g, cgroup=lambda: tight) == HostMemory(8 * GiB, 2 * GiB)
    assert host_memory(virtual_memory=host_24g, cgroup=lambda: None).to_json() == {
        "total_bytes": 24 * GiB,
        "available_bytes": 20 * GiB,
    }


def test_v2_max_means_no_limit(tmp_path: Path) -> None:
    proc, root = make_host(
        tmp_path,
        "0::/user.slice/app\n",
        {"user.slice/app/memory.max": "max", "user.slice/app/memory.current": str(GiB)},
    )
    cgroup = cgroup_memory(proc, root)
    assert cgroup is not None
    assert (cgroup.version, cgroup.limit_bytes, cgroup.usage_bytes) == (2, None, GiB)

    cpu = cpu_device(budget_bytes=None, headroom_bytes=0, virtual_memory=host_24g, cgroup=cgroup)
    assert (cpu.total_bytes, cpu.free_bytes) == (24 * GiB, 20 * GiB)
    assert cpu.description == "RAM 24.0 GiB"


def test_v2_parent_with_smaller_limit_binds(tmp_path: Path) -> None:
    proc, root = make_host(
        tmp_path,
        "0::/user.slice/app\n",
        {
            "user.slice/memory.max": str(4 * GiB),
            "user.slice/memory.current": str(3 * GiB),  # siblings count against the parent's limit
            "user.slice/app/memory.max": str(8 * GiB),
            "user.slice/app/memory.current": str(1 * GiB),
        },
    )
    cgroup = cgroup_memory(proc, root)
    assert cgroup is not None
    assert cgroup.limit_bytes == 4 * GiB
    assert cgroup.usage_bytes == 3 * GiB  # read where the limit binds
    cpu = cpu_device(budget_bytes=None, headroom_bytes=0, virtual_memory=host_24g, cgroup=cgroup)
    assert (cpu.total_bytes, cpu.free_bytes) == (4 * GiB, 1 * GiB)


def test_v2_container_path_not_mounted_falls_back_to_root(tmp_path: Path) -> None:
    proc, root = make_host(
        tmp_path,
        "0::/system.slice/docker-0123abcd.scope\n",
        {"memory.max": str(2 * GiB), "memory.current": str(512 * MiB), "memory.stat": stat(inactive_file=0)},
    )
    cgroup = cgroup_memory(proc, root)
    assert cgroup == CgroupMemory(2, "/system.slice/docker-0123abcd.scope", 2 * GiB, 512 * MiB, 0)


# --- cgroup v1 and hybrid hosts -----------------------------------------------------------------


def test_v1_memory_controller_limit(tmp_path: Path) -> None:
    proc, root = make_host(
        tmp_path,
        "5:devices:/some/path\n4:memory:/some/path\n3:cpu,cpuacct:/some/path\n",
        {
            "memory/some/path/memory.limit_in_bytes": str(6 * GiB),
            "memory/some/path/memory.usage_in_bytes": str(2 * GiB),
            # the hierarchical total wins over this cgroup's own count
            "memory/some/path/memory.stat": stat(inactive_file=1, total_inactive_file=GiB),
        },
    )
    assert cgroup_memory(proc, root) == CgroupMemory(1, "/some/path", 6 * GiB, 2 * GiB, GiB)


def test_v1_huge_value_means_no_limit(tmp_path: Path) -> None:
    proc, root = make_host(
        tmp_path,
        "4:memory:/some/path\n",
        {
            "memory/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/some/path/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/some/path/memory.usage_in_bytes": str(GiB),
            "memory/some/path/memory.stat": stat(inactive_file=MiB),
        },
    )
    assert cgroup_memory(proc, root) == CgroupMemory(1, "/some/path", None, GiB, MiB)


def test_v1_container_path_not_mounted_falls_back_to_root(tmp_path: Path) -> None:
    proc, root = make_host(
        tmp_path,
        "4:memory:/docker/0123abcd\n",
        {"memory/memory.limit_in_bytes": str(3 * GiB), "memory/memory.usage_in_bytes": str(GiB)},
    )
    cgroup = cgroup_memory(proc, root)
    assert cgroup is not None
    assert (cgroup.version, cgroup.limit_bytes, cgroup.usage_bytes) == (1, 3 * GiB, GiB)


HYBRID = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"


def test_hybrid_prefers_v1_memory_controller(tmp_path: Path) -> None:
    proc, root = make_host(
        tmp_path,
        HYBRID,
        {
            "memory/process_api/abc/memory.limit_in_bytes": str(5 * GiB),
            "memory/process_api/abc/memory.usage_in_bytes": str(GiB),
            "unified/cgroup.controllers": "",
            "unified/memory.max": str(9 * GiB),
        },
    )
    assert cgroup_memory(proc, root) == CgroupMemory(1, "/process_api/abc", 5 * GiB, GiB, 0)


def test_hybrid_uses_v2_limit_when_v1_has_none(tmp_path: Path) -> None:
    proc, root = make_host(
        tmp_path,
        HYBRID,
        {
            "memory/process_api/abc/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/process_api/abc/memory.usage_in_bytes": str(GiB),
            "unified/cgroup.controllers": "",
            "unified/memory.max": str(9 * GiB),
            "unified/memory.current": str(2 * GiB),
        },
    )
    assert cgroup_memory(proc, root) == CgroupMemory(2, "/", 9 * GiB, 2 * GiB, 0)


def test_hybrid_without_any_limit_reports_v1_usage(tmp_path: Path) -> None:
    """This machine's shape: v1 memory controller, unlimited; v2 mounted with no memory files."""
    proc, root = make_host(
        tmp_path,
        HYBRID,
        {
            "memory/process_api/abc/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/process_api/abc/memory.usage_in_bytes": str(GiB),
            "unified/cgroup.controllers": "",
        },
    )
    assert cgroup_memory(proc, root) == CgroupMemory(1, "/process_api/abc", None, GiB, 0)


# --- missing and broken files -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proc_cgroup", "files"),
    [
        pytest.param(None, {}, id="no-proc-file"),
        pytest.param("", {}, id="empty-proc-file"),
        pytest.param("not a cgroup line\n::\n", {}, id="garbage-lines"),
        pytest.param("0::/user.slice/app\n", {}, id="v2-no-files"),
        pytest.param("4:memory:/x\n", {}, id="v1-no-files"),
        pytest.param("0::/\n", {"memory.max": "lots", "memory.current": ""}, id="unparseable-values"),
    ],
)
def test_missing_or_broken_files_mean_unknown(tmp_path: Path, proc_cgroup: str | None, files: dict[str, str]) -> None:
    proc, root = make_host(tmp_path, proc_cgroup, files)
    assert cgroup_memory(proc, root) is None


def test_limit_without_usage_or_stat_is_still_a_limit(tmp_path: Path) -> None:
    proc, root = make_host(tmp_path, "0::/app\n", {"app/memory.max": str(8 * GiB)})
    cgroup = cgroup_memory(proc, root)
    assert cgroup == CgroupMemory(2, "/app", 8 * GiB, None, 0)
    cpu = cpu_device(budget_bytes=None, headroom_bytes=0, virtual_memory=host_24g, cgroup=cgroup)
    assert (cpu.total_bytes, cpu.free_bytes) == (8 * GiB, 8 * GiB)


def test_cgroup_over_its_limit_has_zero_free() -> None:
    cgroup = CgroupMemory(2, "/app", limit_bytes=GiB, usage_bytes=2 * GiB, inactive_file_bytes=0)
    cpu = cpu_device(budget_bytes=None, headroom_bytes=0, virtual_memory=host_24g, cgroup=cgroup)
    assert cpu.free_bytes == 0


def test_cgroup_limit_above_ram_leaves_ram_as_total() -> None:
    cgroup = CgroupMemory(2, "/app", limit_bytes=64 * GiB, usage_bytes=GiB, inactive_file_bytes=0)
    cpu = cpu_device(budget_bytes=None, headroom_bytes=0, virtual_memory=host_24g, cgroup=cgroup)
    assert (cpu.total_bytes, cpu.free_bytes, cpu.description) == (24 * GiB, 20 * GiB, "RAM 24.0 GiB")


# --- NVML ---------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


@dataclass
class FakeGPU:
    name: str
    uuid: str
    total_bytes: int
    used_bytes: int
    capability: tuple[int, int]
    broken: bool = False
    processes: tuple[tuple[int, int | None], ...] = ()  # (pid, usedGpuMemory) as NVML lists them


L4 = FakeGPU("NVIDIA L4", "GPU-1111aaaa-0000", 24 * GiB, 2 * GiB, (8, 9))
H100 = FakeGPU("NVIDIA H100 80GB HBM3", "GPU-2222bbbb-0000", 80 * GiB, 10 * GiB, (9, 0))


class FakeNVML:
    """The handful of pynvml functions the probe calls, over a list of fake GPUs."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[FakeGPU], *, init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGPU:
        return self.gpus[index]

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGPU) -> SimpleNamespace:
        if handle.broken:
            raise FakeNVMLError("GPU is lost")
        return SimpleNamespace(
            total=handle.total_bytes, free=handle.total_bytes - handle.used_bytes, used=handle.used_bytes
        )

    def nvmlDeviceGetName(self, handle: FakeGPU) -> str:
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGPU) -> str:
        return handle.uuid

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeGPU) -> tuple[int, int]:
        return handle.capability

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGPU) -> list[SimpleNamespace]:
        if handle.broken:
            raise FakeNVMLError("GPU is lost")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]


def test_two_gpus_from_nvml() -> None:
    nvml = FakeNVML([L4, H100])
    gpus, _notes = cuda_devices(nvml)
    assert [(g.name, g.kind, g.description) for g in gpus] == [
        ("cuda:0", "cuda", "NVIDIA L4"),
        ("cuda:1", "cuda", "NVIDIA H100 80GB HBM3"),
    ]
    l4, h100 = gpus
    assert (l4.total_bytes, l4.free_bytes, l4.used_by_others_bytes) == (24 * GiB, 22 * GiB, 2 * GiB)
    assert (h100.total_bytes, h100.free_bytes, h100.used_by_others_bytes) == (80 * GiB, 70 * GiB, 10 * GiB)
    assert (l4.compute_capability, h100.compute_capability) == ((8, 9), (9, 0))
    assert (nvml.init_calls, nvml.shutdown_calls) == (1, 1)


def test_mixed_gpus_warn_about_cuda_device_order(monkeypatch: pytest.MonkeyPatch) -> None:
    _, notes = cuda_devices(FakeNVML([L4, H100]))
    assert any("CUDA_DEVICE_ORDER=PCI_BUS_ID" in note for note in notes)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert cuda_devices(FakeNVML([L4, H100]))[1] == []
    assert cuda_devices(FakeNVML([H100, H100]))[1] == []


@pytest.mark.parametrize(
    ("visible", "expected", "noted"),
    [
        pytest.param("1", ["NVIDIA H100 80GB HBM3"], False, id="index"),
        pytest.param("1,0", ["NVIDIA H100 80GB HBM3", "NVIDIA L4"], False, id="reordered"),
        pytest.param("GPU-2222", ["NVIDIA H100 80GB HBM3"], False, id="uuid-prefix"),
        pytest.param("0,7,1", ["NVIDIA L4"], True, id="stops-at-missing-index"),
        pytest.param("MIG-abcd", [], True, id="mig-not-listed"),
        pytest.param("0,0", ["NVIDIA L4"], True, id="duplicate"),
    ],
)
def test_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, visible: str, expected: list[str], noted: bool) -> None:
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    gpus, notes = cuda_devices(FakeNVML([L4, H100]))
    assert [g.description for g in gpus] == expected
    assert [g.name for g in gpus] == [f"cuda:{i}" for i in range(len(expected))]
    assert bool(notes) == noted


@pytest.mark.parametrize("visible", ["", "-1"])
def test_cuda_visible_devices_hiding_every_gpu(monkeypatch: pytest.MonkeyPatch, visible: str) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    nvml = FakeNVML([L4])
    gpus, notes = cuda_devices(nvml)
    assert gpus == []
    assert "hides every GPU" in notes[0]
    assert nvml.init_calls == 0


def test_nvml_init_failure_is_a_note_not_an_error() -> None:
    gpus, notes = cuda_devices(FakeNVML([], init_error=FakeNVMLError("Driver Not Loaded")))
    assert gpus == []
    assert notes == ["no NVIDIA GPU found (NVML: Driver Not Loaded)"]


def test_pynvml_not_installed_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    gpus, notes = cuda_devices()
    assert gpus == []
    assert "nvidia-ml-py is not installed" in notes[0]


def test_unreadable_gpu_is_skipped_and_numbering_kept() -> None:
    broken = FakeGPU("NVIDIA L4", "GPU-3333", 24 * GiB, 0, (8, 9), broken=True)
    nvml = FakeNVML([broken, L4])
    gpus, notes = cuda_devices(nvml)
    assert [g.name for g in gpus] == ["cuda:1"]
    assert "cuda:0" in notes[0] and "GPU is lost" in notes[0]
    assert nvml.shutdown_calls == 1


def test_bytes_names_from_old_nvml_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNVML([L4])
    monkeypatch.setattr(nvml, "nvmlDeviceGetName", lambda handle: handle.name.encode())
    gpus, _ = cuda_devices(nvml)
    assert gpus[0].description == "NVIDIA L4"


# --- probe_inventory ----------------------------------------------------------------------------


def inventory(
    nvml: FakeNVML | None = None,
    *,
    memory: str | dict[str, int] | None = None,
    headroom: str | dict[str, int] | None = None,
) -> Inventory:
    """probe_inventory on a simulated 24 GiB host without cgroup limits."""
    return probe_inventory(
        memory=memory, headroom=headroom, nvml=nvml or FakeNVML([]), cgroup=None, virtual_memory=host_24g
    )


def test_budget_and_headroom_for_cpu() -> None:
    inv = inventory(memory="cpu=16GiB", headroom="cpu=1GiB")
    cpu = inv.cpu
    assert (cpu.budget_bytes, cpu.headroom_bytes) == (16 * GiB, GiB)
    assert cpu.usable_bytes == 16 * GiB - GiB  # min(free 20 GiB, budget 16 GiB) - headroom
    assert inv.gpus == ()
    assert inv.bitsandbytes is False


def test_defaults_no_budget_and_default_headroom() -> None:
    inv = inventory(FakeNVML([L4]))
    assert [(d.name, d.budget_bytes, d.headroom_bytes) for d in inv.devices] == [
        ("cpu", None, DEFAULT_HEADROOM_BYTES),
        ("cuda:0", None, DEFAULT_HEADROOM_BYTES),
    ]
    assert inv.cpu.usable_bytes == 20 * GiB - DEFAULT_HEADROOM_BYTES


def test_budget_for_a_missing_device_names_the_devices_found() -> None:
    with pytest.raises(InvalidArgument, match=r"cuda:3.*only cpu \(no NVIDIA GPU found") as excinfo:
        inventory(FakeNVML([], init_error=FakeNVMLError("Driver Not Loaded")), memory="cuda:3=1GiB")
    assert excinfo.value.param == "memory"
    with pytest.raises(InvalidArgument, match=r"--headroom names cuda:2, but this host has only cpu, cuda:0, cuda:1"):
        inventory(FakeNVML([L4, H100]), headroom="cuda:2=1GiB")


def test_plain_byte_counts_and_mappings() -> None:
    assert inventory(memory="cpu=123456789").cpu.budget_bytes == 123456789
    inv = inventory(memory={"cpu": 123456789}, headroom={"CPU": 1000})
    assert (inv.cpu.budget_bytes, inv.cpu.headroom_bytes) == (123456789, 1000)


def test_star_applies_to_every_device_and_names_win() -> None:
    inv = inventory(FakeNVML([L4, H100]), memory="10GiB,cuda:1=40GiB", headroom="256MiB")
    assert [(d.name, d.budget_bytes, d.headroom_bytes) for d in inv.devices] == [
        ("cpu", 10 * GiB, 256 * MiB),
        ("cuda:0", 10 * GiB, 256 * MiB),
        ("cuda:1", 40 * GiB, 256 * MiB),
    ]


def test_budget_above_device_is_capped_with_a_note() -> None:
    inv = inventory(memory="cpu=64GiB")
    assert inv.cpu.budget_bytes == 24 * GiB
    assert any("cpu=64.0 GiB is more than the device has (24.0 GiB)" in note for note in inv.notes)


def test_headroom_swallowing_the_budget_is_noted() -> None:
    inv = inventory(memory="cpu=1GiB", headroom="cpu=2GiB")
    assert inv.cpu.usable_bytes == 0
    assert any("leaves nothing usable" in note for note in inv.notes)


def test_cgroup_is_applied_to_cpu() -> None:
    cgroup = CgroupMemory(2, "/app", limit_bytes=8 * GiB, usage_bytes=GiB, inactive_file_bytes=0)
    inv = probe_inventory(nvml=FakeNVML([]), cgroup=cgroup, virtual_memory=host_24g, memory="cpu=16GiB")
    assert (inv.cpu.total_bytes, inv.cpu.free_bytes, inv.cpu.budget_bytes) == (8 * GiB, 7 * GiB, 8 * GiB)


@pytest.mark.parametrize(("gpus", "expected"), [([], False), ([L4], True)])
def test_bitsandbytes_needs_a_gpu(monkeypatch: pytest.MonkeyPatch, gpus: list[FakeGPU], expected: bool) -> None:
    monkeypatch.setattr(probe, "bitsandbytes_available", lambda: True)
    assert inventory(FakeNVML(gpus)).bitsandbytes is expected


def test_bitsandbytes_available_does_not_import_it() -> None:
    before = "bitsandbytes" in sys.modules
    assert isinstance(probe.bitsandbytes_available(), bool)
    assert ("bitsandbytes" in sys.modules) == before


# --- this machine -------------------------------------------------------------------------------


def test_real_probe_of_this_machine() -> None:
    cgroup = cgroup_memory()
    assert cgroup is None or cgroup.version in (1, 2)
    inv = probe_inventory()
    assert inv.cpu.total_bytes > 0
    assert inv.cpu.free_bytes > 0
    assert inv.cpu.headroom_bytes == DEFAULT_HEADROOM_BYTES
    assert all(gpu.total_bytes > 0 for gpu in inv.gpus)


# --- GPU memory per runner (the watchdog's reading) ---------------------------------------------------


def test_gpu_memory_of_a_process_tree_per_visible_gpu() -> None:
    l4 = replace(L4, processes=((100, 1 * GiB), (999, 5 * GiB)))  # 999 is someone else's
    h100 = replace(H100, processes=((101, 2 * GiB), (100, None)))  # None: the driver could not tell
    nvml = FakeNVML([l4, h100])
    sample = GpuProcessMemory(nvml)
    assert sample([100, 101]) == {"cuda:0": 1 * GiB, "cuda:1": 2 * GiB}
    assert sample([101]) == {"cuda:1": 2 * GiB}
    assert sample([555]) == {}  # a CPU runner: no GPU entry at all, not zeros
    assert nvml.init_calls == 1  # opened once, kept open


def test_gpu_memory_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    nvml = FakeNVML([replace(L4, processes=((100, GiB),)), replace(H100, processes=((100, 3 * GiB),))])
    assert GpuProcessMemory(nvml)([100]) == {"cuda:0": 3 * GiB}  # the H100 is the runner's cuda:0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert GpuProcessMemory(nvml)([100]) == {}


def test_gpu_memory_without_nvml_or_with_a_lost_gpu_reads_what_it_can() -> None:
    no_driver = FakeNVML([L4], init_error=FakeNVMLError("Driver Not Loaded"))
    sample = GpuProcessMemory(no_driver)
    assert sample([100]) == {} and sample([100]) == {}
    assert no_driver.init_calls == 1  # not retried every watchdog tick

    lost = replace(H100, broken=True, processes=((100, GiB),))
    assert GpuProcessMemory(FakeNVML([replace(L4, processes=((100, GiB),)), lost]))([100]) == {"cuda:0": GiB}
