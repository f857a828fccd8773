"""Prepacked bf16 Linear weights on CPU: the same oneDNN matmul, in its own weight layout.

Decoding is a stream of small matmuls (one row per running sequence) that read every weight once per
step, so a step takes as long as reading the weights does. ``F.linear`` on a plain bf16 weight hands
oneDNN a row-major matrix that it re-lays-out for its kernel on every call; packed once at load time
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's ``freezing`` does for CPU), the matmul
reads the weight as stored. ``benchmarks/linear_kernels.py`` on this project's 2-core VM, 1b-sized
layers out of cache: ×1.8–2.1 faster at 1–8 rows, ×1.06 at 320 (prefill), bit-identical results (same
kernel, same accumulation); ``benchmarks/serve_throughput.py`` shows what it does for a served model.

Only bf16 weights on CPU, where oneDNN has native bf16 kernels, are packed: an fp32 ``F.linear`` runs
MKL, whose results oneDNN would not reproduce bit for bit. A weight that is also used elsewhere
(tied input and output embeddings) stays as it is; packing it would keep two copies. So does one that
no forward calls: the load runs one forward first and packs only the Linears it saw called, since a
model that does its own arithmetic with a Linear's weight (the mamba family) cannot take a packed one.
If the warm-up forward still fails once packed, the load fails with a message naming the switch below.

The checkpoint's weights are mapped from their files (transformers 5 maps safetensors lazily), and a
mapping stays whole while any of its tensors is alive, so dropping a packed weight would not return
its pages: resident memory would hold the file's pages and the packed copy, twice the plan. Once a
weight is packed, its file pages are dropped from this process with ``madvise(MADV_DONTNEED)``; they
stay in the page cache, and reading them again would fault them back from the file. That is only done
for whole pages inside a file mapping that no other tensor of the model reads.

``MEMSERVE_PACK_LINEAR=0`` turns packing off (to compare, or if a torch build misbehaves).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ENV_SWITCH = "MEMSERVE_PACK_LINEAR"
_MADV_DONTNEED = 4  # linux/mman.h


@dataclass
class PackReport:
    """What packing did: layers and bytes packed, file-mapped bytes handed back, or why it did not run."""

    layers: int = 0
    packed_bytes: int = 0
    released_file_bytes: int = 0
    not_called: int = 0  # bf16 Linears the probe forward never called: left as they are
    skipped_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.skipped_reason is not None:
            return {"kernel": "torch", "reason": self.skipped_reason}
        return {
            "kernel": "onednn-packed",
            "layers": self.layers,
            "packed_bytes": self.packed_bytes,
            "released_file_bytes": self.released_file_bytes,
            "not_called": self.not_called,
        }


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is held in oneDNN's packed layout; inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.register_buffer("weight", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


def why_not_pack(model: nn.Module, env: dict[str, str] | None = None) -> str | None:
    """None when the model's bf16 CPU Linears can be packed, else the reason in words."""
    env = dict(os.environ) if env is None else env
    if env.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"turned off by {ENV_SWITCH}"
    if not any(_packable(m) for m in model.modules()):
        return "no bf16 Linear weights on cpu"
    ops = ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported")
    if not (torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, op) for op in ops)):
        return "this torch build has no oneDNN linear packing"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bf16 for oneDNN"
    return _self_check()


def pack_linear_weights(
    model: nn.Module, *, probe: Callable[[], object] | None = None, on_bytes: Callable[[int], None] | None = None
) -> PackReport:
    """Replace the packable Linears of ``model`` with :class:`PackedLinear`, in place.

    ``probe`` runs a forward first, and only the Linears it calls are packed: a model that reads a
    Linear's weight for its own arithmetic (the mamba family does) never calls that Linear, and its
    weight stays a plain tensor. ``on_bytes`` is told the bytes of each weight as it is packed
    (packing reads every page of it).
    """
    reason = why_not_pack(model)
    if reason is not None:
        return PackReport(skipped_reason=reason)
    called = _called_linears(model, probe) if probe is not None else None
    uses: dict[int, int] = {}
    for _, tensor in _all_tensors(model):
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    report = PackReport()
    targets = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if not (isinstance(child, nn.Linear) and _packable(child)) or uses[id(child.weight)] > 1:
                continue
            if called is not None and id(child) not in called:
                report.not_called += 1
            else:
                targets.append((parent, name))
    packing = {id(getattr(parent, name).weight) for parent, name in targets}
    keep = _kept_ranges(model, packing)
    mappings = _FileMappings.of_this_process()
    with torch.inference_mode():
        for parent, name in targets:
            child = getattr(parent, name)
            weight = child.weight
            setattr(parent, name, PackedLinear(child))
            del child  # nothing but ``weight`` holds the old layer now, and it goes at the end of this pass
            nbytes = weight.numel() * weight.element_size()
            report.layers += 1
            report.packed_bytes += nbytes
            if weight.is_contiguous():
                report.released_file_bytes += mappings.release(weight.data_ptr(), nbytes, keep)
            del weight  # an anonymous weight is freed here: at most one layer is held twice
            if on_bytes is not None:
                on_bytes(nbytes)
    _trim_heap()
    return report


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ALLOCATOR_SETTINGS = {"arena_max": 2, "mmap_threshold_bytes": 1 << 20, "trim_threshold_bytes": 8 << 20}
"""Why: glibc keeps what a process frees, and the watchdog measures resident memory.

- By default each thread that allocates gets its own arena (up to 8 per core), and each keeps its
  freed chunks: the generation thread, the event loop and the load thread each hold their own slack.
- The mmap threshold starts at 128 KiB and *rises* to the size of every mmapped block freed (up to
  32 MiB), so after one prefill its activations (1–32 MiB each) come from the heap, and a heap
  fragmented by a cache grown with ``torch.cat`` (the ``generate`` fallback) keeps them.
A fixed 1 MiB threshold sends every tensor of a prefill to mmap, returned to the system when freed
(a page-fault cost of a few ms per prefill forward), and two arenas bound the per-thread slack. An
operator's own ``MALLOC_*`` environment wins."""


def tune_allocator(env: dict[str, str] | None = None) -> dict[str, int]:
    """Apply :data:`ALLOCATOR_SETTINGS` through ``mallopt`` (before the model loads); what was set."""
    environ = os.environ if env is None else env
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in environ):
        return {}
    applied: dict[str, int] = {}
    with contextlib.suppress(OSError, AttributeError):
        libc = _libc()
        for name, param in (
            ("arena_max", _M_ARENA_MAX),
            ("mmap_threshold_bytes", _M_MMAP_THRESHOLD),
            ("trim_threshold_bytes", _M_TRIM_THRESHOLD),
        ):
            if libc.mallopt(param, ALLOCATOR_SETTINGS[name]) == 1:
                applied[name] = ALLOCATOR_SETTINGS[name]
    return applied


def trim_heap() -> None:
    """Hand freed heap memory back to the system now (after the worst-case warm-up, say)."""
    _trim_heap()


def _trim_heap() -> None:
    """Give the freed plain weights back to the OS: glibc keeps freed heap memory for reuse, and resident
    memory is what the watchdog measures (a bf16 copy of an fp32 checkpoint: +65 MiB after packing a
    0.1B model, +31 MiB once trimmed)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    """The process's own C library (dlopen of NULL sees the symbols already loaded). ``find_library("c")``
    would run ``ldconfig -p`` in a child: a vfork of the whole runner, counted twice by an RSS sample."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _called_linears(model: nn.Module, probe: Callable[[], object]) -> set[int]:
    """The ids of the packable Linears a forward calls (ids: holding the layers would keep them alive)."""
    called: set[int] = set()
    hooks = [
        m.register_forward_pre_hook(lambda module, args: called.add(id(module)))
        for m in model.modules()
        if _packable(m)
    ]
    try:
        with torch.inference_mode():
            probe()
    finally:
        for hook in hooks:
            hook.remove()
    return called


def _packable(module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and not weight.is_meta


def _self_check() -> str | None:
    """Pack a small random layer and compare with ``F.linear``; a build that disagrees is not used."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48, dtype=torch.bfloat16)
    with torch.inference_mode():
        linear.weight.copy_(torch.randn(48, 64, generator=generator))
        x = torch.randn(3, 64, generator=generator).to(torch.bfloat16)
        expected = linear(x)
        try:
            got = PackedLinear(linear)(x)
        except Exception as exc:  # a private op: any change of its signature or behaviour means "don't"
            return f"oneDNN linear packing failed here ({type(exc).__name__}: {exc})"
    if not torch.equal(got, expected):
        return "oneDNN's packed linear does not reproduce F.linear on this machine"
    return None


def _all_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _kept_ranges(model: nn.Module, packing: set[int]) -> list[tuple[int, int]]:
    """Byte ranges of the model's tensors that stay plain (all but the ids in ``packing``): their pages stay."""
    return [
        _byte_span(t)
        for _, t in _all_tensors(model)
        if id(t) not in packing and t.device.type == "cpu" and t.numel() > 0 and not t.is_mkldnn
    ]  # a oneDNN-packed tensor (an int8 rung's weight) has no pointer into a file: nothing of it to keep


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """Every byte a tensor can read, strided views included (their elements are not contiguous)."""
    low = high = 0
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        reach = (size - 1) * stride
        low, high = (low + reach, high) if reach < 0 else (low, high + reach)
    size = tensor.element_size()
    return tensor.data_ptr() + low * size, tensor.data_ptr() + (high + 1) * size


class _FileMappings:
    """This process's file-backed mappings (from ``/proc/self/maps``), and dropping pages of them."""

    def __init__(self, spans: list[tuple[int, int]], madvise: Callable[[int, int], int] | None) -> None:
        self._spans = sorted(spans)
        self._starts = [start for start, _ in self._spans]
        self._madvise = madvise

    @classmethod
    def of_this_process(cls) -> _FileMappings:
        if not sys.platform.startswith("linux"):
            return cls([], None)
        spans = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if path.startswith("/") and not path.endswith(" (deleted)"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    spans.append((start, end))
        return cls(spans, lambda address, length: int(_libc().madvise(address, length, _MADV_DONTNEED)))

    def release(self, address: int, nbytes: int, keep: list[tuple[int, int]]) -> int:
        """Drop the whole pages of ``[address, address + nbytes)`` if they lie in one file mapping and
        no range in ``keep`` overlaps them; the bytes dropped (0 when nothing was)."""
        if self._madvise is None or nbytes <= 0:
            return 0
        page = mmap.PAGESIZE
        start = -(-address // page) * page
        end = (address + nbytes) // page * page
        i = bisect.bisect_right(self._starts, start) - 1
        if end <= start or i < 0 or self._spans[i][1] < end:
            return 0  # not (wholly) in a file mapping: anonymous memory is freed when the weight is
        if any(lo < end and start < hi for lo, hi in keep):
            return 0
        return end - start if self._madvise(start, end - start) == 0 else 0
