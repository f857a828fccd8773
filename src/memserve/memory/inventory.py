"""What memory a host offers: devices, budgets and headroom, as plain data.

The planner reads an Inventory and never probes the machine itself; ``memory.probe`` builds one from
the real host (cgroups, NVML), and tests build them by hand for simulated hosts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DeviceKind = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class Device:
    """One memory pool: host RAM (``cpu``) or one GPU (``cuda:N``).

    ``total_bytes`` is the device's capacity as this process sees it (for RAM: the smallest of
    physical memory and any cgroup limit). ``free_bytes`` is what could be allocated right now.
    ``budget_bytes`` is the most memserve may use there (``--memory``), ``headroom_bytes`` what it
    never hands out.
    """

    name: str
    kind: DeviceKind
    total_bytes: int
    free_bytes: int
    budget_bytes: int | None = None
    headroom_bytes: int = 0
    description: str = ""
    # bytes in use by processes that are not memserve's (NVML per-process accounting; 0 for cpu)
    used_by_others_bytes: int = 0
    # cuda only: compute capability, e.g. (8, 9) for an L4; bf16 needs >= (8, 0)
    compute_capability: tuple[int, int] | None = None

    @property
    def usable_bytes(self) -> int:
        """What a plan may reserve here: free memory capped by the budget, less the headroom."""
        limit = self.free_bytes if self.budget_bytes is None else min(self.free_bytes, self.budget_bytes)
        return max(0, limit - self.headroom_bytes)


@dataclass(frozen=True)
class Inventory:
    """The devices of one host plus what software is installed that changes which plans are possible."""

    devices: tuple[Device, ...]
    # bitsandbytes importable and a CUDA GPU present: GPU int8 / 4-bit rungs become possible
    bitsandbytes: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def cpu(self) -> Device:
        for device in self.devices:
            if device.kind == "cpu":
                return device
        raise LookupError("inventory has no cpu device")

    @property
    def gpus(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.kind == "cuda")

    def get(self, name: str) -> Device | None:
        return next((d for d in self.devices if d.name == name), None)
