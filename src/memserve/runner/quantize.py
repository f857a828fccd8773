"""int8 and 4-bit Linear layers on CPU, with torch's own kernels (no bitsandbytes, no GPU).

The CPU rungs ``cpu-int8`` and ``cpu-4bit`` (``memory/planner.py``) are served by these, as gpt-fast's
``quantize.py`` does it:

- int8: each output row of a weight is scaled into [-127, 127] by its largest magnitude (one scale per row).
  Two kernels multiply, chosen once per process by :func:`int8_kernel`:

  - ``onednn-w8a8`` (:class:`DynamicInt8Linear`), where the CPU has int8 dot products (VNNI or AMX): the
    weight is prepacked for oneDNN (``torch.ops.onednn.qlinear_prepack``, what inductor's x86 int8 path
    uses) and each call quantizes its input per token, one scale per row (``max|row| / 127``), so a row's
    result depends on that row alone, as in a batch of one. oneDNN multiplies uint8 × int8 into int32 and
    the row and column scales are applied after. This is the W8A8-dynamic scheme of torchao, IPEX's
    ``lowp_mode=INT8`` and vLLM's CPU int8 path; measured in ``docs/cpu-quantization.md``: ×1.5 packed bf16
    at 1 to 64 rows, where the weight-only kernel is ×0.9 at 1 row and ×0.4 at 64.
  - ``weight-only`` (:class:`Int8Linear`) everywhere else: ``torch.ops.aten._weight_int8pack_mm(x, int8
    weight, scales)`` with the scales in the compute dtype; activations stay as they are.
- 4-bit: each row is cut into groups of ``CPU_INT4_GROUP_SIZE`` (32) weights, each group mapped onto 0..15
  between its minimum and maximum (asymmetric: a scale and a zero point per group, in the compute dtype);
  ``_convert_weight_to_int4pack_for_cpu`` packs two per byte in the kernel's layout, and
  ``_weight_int4pack_mm_for_cpu`` multiplies. It needs the input width to be a multiple of the group size and
  the output width a multiple of 16; a Linear that is not is left as it is (the planner rules such models out).

Which layers: every ``nn.Linear`` inside a decoder layer (what ``checkpoint/facts.py`` counts as quantizable:
a 2-D ``.weight`` under ``layers.N.``); embeddings, the LM head and norms stay as stored, mapped from the file.

Memory: the checkpoint is mapped from its files, so a Linear's weight is only read (faulted in) when it is
quantized. Each weight is quantized in slices of rows (the fp32 transient is a few MiB, ``SLICE_ELEMENTS``),
then its file pages are dropped from this process (``madvise(MADV_DONTNEED)``, as ``runner/kernels.py`` does
for packed weights), so the model is never resident in its full width: the peak is the quantized weights
plus the unquantized ones plus one slice.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memserve.errors import InvalidArgument
from memserve.memory.estimate import CPU_INT4_GROUP_SIZE
from memserve.runner.kernels import _FileMappings, _kept_ranges, trim_heap

# checkpoint/facts.py's layer pattern: the Linears it prices as quantizable are the ones quantized here
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")
SLICE_ELEMENTS = 1 << 20  # weights quantized at once: bounds the fp32 transient to ~4 MiB per tensor held
INT4_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
INT8_KERNEL_ENV = "MEMSERVE_CPU_INT8_KERNEL"  # auto (default), onednn-w8a8, weight-only
INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # /proc/cpuinfo: u8 × s8 sums into int32 without saturating
ACTIVATION_ZERO_POINT = 128
W8A8_CHECK_TOLERANCE = 0.05  # the check's rows quantize exactly or nearly: saturation is off by far more
INT4_SLICE_ROWS = 64  # slices of rows pack the same as the whole weight (checked in tests/runner/test_quantize.py)


class Int8Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` as int8 rows and one scale per row; inference only."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight, scales = quantize_int8(linear.weight.detach())
        return cls(weight, scales, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._multiply(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _multiply(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)

    def dequantized(self) -> torch.Tensor:
        """The weight these bytes stand for, in fp32 (for tests and quality checks)."""
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


class DynamicInt8Linear(Int8Linear):
    """:class:`Int8Linear` with ``W`` prepacked for oneDNN and ``x`` quantized per row at each call."""

    zero_points: torch.Tensor

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(torch.ops.onednn.qlinear_prepack(weight, None), scales.float(), bias)
        self.out_features, self.in_features = weight.shape  # the packed weight is laid out [in, out]
        self.register_buffer("zero_points", torch.zeros(1, dtype=torch.int32), persistent=False)  # symmetric

    def _multiply(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.float()
        # uint8 around 128 (oneDNN's u8 × s8), one scale per row: [-127, 127] + 128
        row_scales = (flat.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        quantized = (flat / row_scales).round_().add_(ACTIVATION_ZERO_POINT).to(torch.uint8)  # x is not written
        y = torch.ops.onednn.qlinear_pointwise(
            quantized, 1.0, ACTIVATION_ZERO_POINT, self.weight, self.scales, self.zero_points,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return y.mul_(row_scales).to(rows.dtype)

    def packed_bytes(self) -> int:
        return int(torch.ops.mkldnn._nbytes(self.weight)) + self.scales.numel() * 4

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError("oneDNN's packed layout is not read back; quantize_int8 gives the int8 rows")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row, int8 inputs per row"


def int8_kernel(env: dict[str, str] | None = None) -> tuple[str, str]:
    """``(kernel, why)`` for the int8 rung on this machine: ``onednn-w8a8`` or ``weight-only``, and the reason."""
    env = dict(os.environ) if env is None else env
    asked = env.get(INT8_KERNEL_ENV, "").strip().lower()
    if asked in ("weight-only", "weight_only"):
        return "weight-only", f"asked by {INT8_KERNEL_ENV}"
    if asked not in ("", "auto", "onednn-w8a8"):
        raise InvalidArgument(f"{INT8_KERNEL_ENV} must be auto, onednn-w8a8 or weight-only, got {asked!r}")
    return _onednn_w8a8_usable()


@functools.cache
def _onednn_w8a8_usable() -> tuple[str, str]:
    if not (hasattr(torch.ops.onednn, "qlinear_prepack") and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return "weight-only", "this torch build has no oneDNN int8 linear"
    flags = _cpu_flags()
    if not flags & INT8_DOT_FLAGS:
        return "weight-only", "this CPU has no int8 dot-product instructions (VNNI or AMX)"
    return _self_check_w8a8()


def _self_check_w8a8() -> tuple[str, str]:
    """Run the oneDNN kernel where an int16 intermediate would saturate, against the float product."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator).sign() * 0.5  # every weight at ±127 once quantized
    x = torch.cat([weight[:2].clone(), torch.randn(3, 256, generator=generator)])  # rows aligned with the weight
    try:
        with torch.inference_mode():
            layer = DynamicInt8Linear(*quantize_int8(weight), None)
            got = layer(x)
    except RuntimeError as exc:
        return "weight-only", f"the oneDNN int8 linear failed its check ({exc})"
    expected = x @ weight.t()
    error = float((got - expected).norm() / expected.norm())
    if not error < W8A8_CHECK_TOLERANCE:
        return "weight-only", f"the oneDNN int8 linear is off by {error:.1%} on this CPU"
    return "onednn-w8a8", "int8 dot products with int8 inputs per token (oneDNN)"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class Int4Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` as 4-bit groups packed for the CPU kernel, a scale and zero per group."""

    weight: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        in_features: int,
        group_size: int,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, packed.shape[0], group_size
        self.register_buffer("weight", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = CPU_INT4_GROUP_SIZE) -> Int4Linear:
        packed, scales_and_zeros = quantize_int4(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, scales_and_zeros, bias, in_features=linear.in_features, group_size=group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit groups of {self.group_size}"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 rows and one scale per row (in the weight's dtype), a slice of rows at a time."""
    rows, cols = weight.shape
    quantized = torch.empty(rows, cols, dtype=torch.int8)
    scales = torch.empty(rows, dtype=weight.dtype)
    step = max(1, SLICE_ELEMENTS // max(1, cols))
    with torch.inference_mode():
        for start in range(0, rows, step):
            part = weight[start : start + step].float()
            scale = (part.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            scale = scale.to(weight.dtype).float()  # quantize against the scale the kernel will use
            quantized[start : start + step] = torch.round(part / scale[:, None]).clamp(-128, 127).to(torch.int8)
            scales[start : start + step] = scale.to(weight.dtype)
    return quantized, scales


def quantize_int4(weight: torch.Tensor, group_size: int = CPU_INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed 4-bit weight ``[rows, cols / 2]`` and ``[cols / group, rows, 2]`` scales and zeros (weight dtype).

    As gpt-fast's ``group_quantize_tensor``: per group, ``scale = (max - min) / 15``, values ``round((w - min) /
    scale)`` in 0..15, and the zero point the kernel adds back is ``min + 8 × scale`` (it computes
    ``(q - 8) × scale + zero``).
    """
    rows, cols = weight.shape
    if cols % group_size or rows % INT4_ROW_MULTIPLE:
        raise InvalidArgument(
            f"4-bit on CPU needs an input width that is a multiple of {group_size} and an output width that is a "
            f"multiple of {INT4_ROW_MULTIPLE}, got a {rows} × {cols} weight; serve this model with int8"
        )
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
    scales_and_zeros = torch.empty(cols // group_size, rows, 2, dtype=weight.dtype)
    step = max(INT4_SLICE_ROWS, SLICE_ELEMENTS // cols // INT4_SLICE_ROWS * INT4_SLICE_ROWS)
    with torch.inference_mode():
        for start in range(0, rows, step):
            part = weight[start : start + step].float()
            n = part.shape[0]
            groups = part.reshape(n, -1, group_size)
            low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
            scale = ((high - low) / 15).clamp(min=1e-6).to(weight.dtype).float()
            zero = (low + 8 * scale).to(weight.dtype).float()
            # the kernel computes (q - 8) × scale + zero: round against the stored scale and zero
            q = torch.round((groups - zero) / scale + 8).clamp(0, 15).to(torch.int32).reshape(n, cols)
            packed[start : start + n] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            both = torch.cat([scale, zero], dim=-1).transpose(0, 1)  # [groups, n, 2]
            scales_and_zeros[:, start : start + n] = both.to(weight.dtype)
    return packed, scales_and_zeros


@dataclass
class QuantizeReport:
    """What quantizing did: layers and bytes, file-mapped bytes handed back, Linears left as they were and why."""

    quantization: str
    kernel: str = ""
    kernel_reason: str = ""
    layers: int = 0
    params: int = 0
    quantized_bytes: int = 0
    released_file_bytes: int = 0
    kept: dict[str, int] | None = None  # reason → Linears inside the layers left unquantized

    def to_json(self) -> dict[str, Any]:
        return {
            "quantization": self.quantization,
            "kernel": self.kernel,
            "kernel_reason": self.kernel_reason,
            "layers": self.layers,
            "params": self.params,
            "quantized_bytes": self.quantized_bytes,
            "released_file_bytes": self.released_file_bytes,
            "kept": dict(self.kept or {}),
        }


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """``(qualified name, parent, attribute, Linear)`` for every plain Linear inside a decoder layer."""
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if type(child) is nn.Linear and _LAYER.search(f"{name}.weight"):
                found.append((name, parent, attr, child))
    return found


def quantize_linears(
    model: nn.Module, quantization: str, *, on_bytes: Callable[[int], None] | None = None
) -> QuantizeReport:
    """Replace the decoder layers' Linears of a CPU ``model`` with int8 (:func:`int8_kernel`'s) or 4-bit ones.

    One weight at a time: quantize it, swap the module, and drop the weight's file pages (when no other tensor
    reads them), so the peak holds one full-width weight at most. ``on_bytes`` is told each weight's full-width
    bytes as it is read.
    """
    if quantization not in ("int8", "4bit"):
        raise InvalidArgument(f"CPU quantization must be int8 or 4bit, got {quantization!r}")
    if quantization == "int8":
        kernel, reason = int8_kernel()
        make: Callable[[nn.Linear], nn.Module] = (
            DynamicInt8Linear.from_linear if kernel == "onednn-w8a8" else Int8Linear.from_linear
        )
    else:
        kernel, reason, make = "aten._weight_int4pack_mm_for_cpu", "the one 4-bit CPU kernel", Int4Linear.from_linear
    report = QuantizeReport(quantization, kernel, reason, kept={})
    uses: dict[int, int] = {}
    for _, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    targets: list[tuple[nn.Module, str]] = []
    for _, parent, attr, linear in quantizable_linears(model):
        why = _why_kept(linear, quantization, shared=uses[id(linear.weight)] > 1)
        if why is None:
            targets.append((parent, attr))
        else:
            report.kept = {**(report.kept or {}), why: (report.kept or {}).get(why, 0) + 1}
    keep = _kept_ranges(model, {id(getattr(parent, attr).weight) for parent, attr in targets})
    mappings = _FileMappings.of_this_process()
    for parent, attr in targets:
        linear = getattr(parent, attr)
        module = make(linear)
        setattr(parent, attr, module)
        weight = linear.weight
        del linear  # nothing but ``weight`` holds the old layer now
        nbytes = weight.numel() * weight.element_size()
        report.layers += 1
        report.params += weight.numel()
        report.quantized_bytes += quantized_bytes(module)
        if weight.is_contiguous():
            report.released_file_bytes += mappings.release(weight.data_ptr(), nbytes, keep)
        del weight  # an anonymous weight is freed here: one full-width weight at a time
        if on_bytes is not None:
            on_bytes(nbytes)
    trim_heap()
    return report


def quantized_bytes(module: nn.Module) -> int:
    """The bytes a quantized Linear holds (a packed oneDNN weight counts what oneDNN allocated)."""
    if isinstance(module, DynamicInt8Linear):
        return module.packed_bytes()
    return sum(t.numel() * t.element_size() for t in module.buffers())


def _why_kept(linear: nn.Linear, quantization: str, *, shared: bool) -> str | None:
    if linear.weight.device.type != "cpu":
        return "not on cpu"
    if not linear.weight.is_floating_point() or linear.weight.is_meta:
        return "not a floating-point weight"
    if shared:
        return "weight shared with another tensor"
    if quantization == "4bit" and (linear.in_features % CPU_INT4_GROUP_SIZE or linear.out_features % INT4_ROW_MULTIPLE):
        return f"width not a multiple of {CPU_INT4_GROUP_SIZE} (in) or {INT4_ROW_MULTIPLE} (out)"
    return None
