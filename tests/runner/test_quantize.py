"""CPU int8 and 4-bit Linears (torch's own kernels) against float matmuls, and what quantizing a model touches."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from memserve.checkpoint.locate import read_facts
from memserve.errors import InvalidArgument
from memserve.runner import quantize
from memserve.runner.quantize import (
    DynamicInt8Linear,
    Int4Linear,
    Int8Linear,
    int8_kernel,
    quantize_int4,
    quantize_int8,
    quantize_linears,
)

W8A8 = int8_kernel({})[0] == "onednn-w8a8"
needs_w8a8 = pytest.mark.skipif(not W8A8, reason=f"oneDNN's int8 kernel is not used here: {int8_kernel({})[1]}")


def _linear(rows: int, cols: int, dtype: torch.dtype, *, bias: bool = True, seed: int = 0) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cols, rows, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(rows, cols, generator=generator) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(rows, generator=generator))
    return linear


def _inputs(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def _dequantized_int4(module: Int4Linear, rows: int, cols: int) -> torch.Tensor:
    """The weight the 4-bit kernel multiplies by, recovered through the kernel itself (x = identity)."""
    eye = torch.eye(cols, dtype=module.scales_and_zeros.dtype)
    bias, module.bias = module.bias, None
    try:
        return module(eye).float().t()
    finally:
        module.bias = bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64)], ids=["2d", "3d"])
def test_int8_linear_is_the_float_matmul_within_its_rounding(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    linear = _linear(96, 64, dtype)
    x = _inputs(shape, dtype)
    quantized = Int8Linear.from_linear(linear)
    got = quantized(x).float()
    assert got.shape == (*shape[:-1], 96) and quantized.weight.dtype == torch.int8
    # exactly the dequantized weight's product, up to the compute dtype's rounding
    reference = x.float() @ quantized.dequantized().t() + linear.bias.float()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got, reference, atol=tolerance, rtol=tolerance)
    # and the float product within what rounding each weight by half a step can change: Σ|x| × scale / 2
    expected = linear(x).float()
    bound = (x.float().abs() @ (quantized.scales.float()[:, None] / 2).expand(96, 64).t()) + tolerance
    assert ((got - expected).abs() <= bound + 1e-3).all()
    assert (got - expected).abs().max() > 0  # it is quantized: not bit-identical


@needs_w8a8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64)], ids=["2d", "3d"])
def test_w8a8_linear_is_the_product_of_its_int8_inputs_and_weights(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    linear = _linear(96, 64, dtype)
    x = _inputs(shape, dtype) * 4
    before = x.clone()
    layer = DynamicInt8Linear.from_linear(linear)
    got = layer(x)
    assert got.shape == (*shape[:-1], 96) and got.dtype == dtype and torch.equal(x, before)  # x is not written
    # the exact product of the per-row int8 inputs and the int8 weights (int32 sums), scaled back
    rows = x.reshape(-1, 64).float()
    row_scales = rows.abs().amax(1, keepdim=True) / 127
    weight, scales = quantize_int8(linear.weight.detach())
    exact = (torch.round(rows / row_scales) @ weight.float().t()) * row_scales * scales.float() + linear.bias.float()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float().reshape(-1, 96), exact, atol=tolerance, rtol=tolerance)
    # and within a few percent of the float product: both sides are rounded to 8 bits
    expected = linear(x).detach().float()
    assert 0 < float((got.float() - expected).norm() / expected.norm()) < 0.03


@needs_w8a8
def test_w8a8_rows_do_not_depend_on_each_other() -> None:
    """Each row is quantized by its own scale: a row's result is the same alone as beside a row 1000× larger."""
    layer = DynamicInt8Linear.from_linear(_linear(96, 64, torch.bfloat16))
    x = _inputs((2, 64), torch.bfloat16)
    x[1] *= 1000
    assert torch.equal(layer(x)[0], layer(x[:1])[0])


def test_the_w8a8_check_catches_a_kernel_that_saturates() -> None:
    """oneDNN without VNNI sums u8 × s8 pairs in int16, which saturates: its self-check must refuse it."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        pytest.skip("this torch build has no oneDNN int8 linear")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("ONEDNN_MAX_CPU_ISA=AVX2 is an x86 setting")
    code = "from memserve.runner.quantize import _self_check_w8a8; print(_self_check_w8a8())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "('weight-only', 'the oneDNN int8 linear is off by" in done.stdout


def test_the_int8_kernel_can_be_chosen_by_the_environment() -> None:
    assert int8_kernel({"MEMSERVE_CPU_INT8_KERNEL": "weight-only"}) == (
        "weight-only",
        "asked by MEMSERVE_CPU_INT8_KERNEL",
    )
    assert int8_kernel({"MEMSERVE_CPU_INT8_KERNEL": "auto"}) == int8_kernel({})
    with pytest.raises(InvalidArgument, match="MEMSERVE_CPU_INT8_KERNEL must be auto, onednn-w8a8 or weight-only"):
        int8_kernel({"MEMSERVE_CPU_INT8_KERNEL": "fast"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 128), (2, 5, 128)], ids=["2d", "3d"])
def test_int4_linear_is_the_float_matmul_within_its_rounding(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    linear = _linear(96, 128, dtype)
    x = _inputs(shape, dtype)
    quantized = Int4Linear.from_linear(linear)
    got = quantized(x).float()
    assert got.shape == (*shape[:-1], 96)
    assert quantized.weight.dtype == torch.uint8 and quantized.weight.numel() == 96 * 128 // 2
    assert quantized.scales_and_zeros.shape == (128 // 32, 96, 2)
    weight = _dequantized_int4(quantized, 96, 128)
    # each weight is within half a step of its group's 16 levels
    groups = linear.weight.detach().float().reshape(96, 4, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    error = (weight - linear.weight.detach().float()).reshape(96, 4, 32).abs()
    assert (error <= step[..., None] * 0.5 + (1e-5 if dtype == torch.float32 else 2e-2)).all()
    expected = linear(x).float()
    relative = (got - expected).norm() / expected.norm()
    assert 0 < relative < 0.1


def test_int4_slices_of_rows_pack_as_the_whole_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = _linear(208, 64, torch.float32).weight.detach()  # 208 rows: slices of 64, 64, 64, then 16
    whole = quantize_int4(weight)
    monkeypatch.setattr(quantize, "SLICE_ELEMENTS", 64 * 64)
    sliced = quantize_int4(weight)
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[1], sliced[1])


def test_int4_refuses_widths_its_kernel_cannot_take() -> None:
    with pytest.raises(InvalidArgument, match="multiple of 32"):
        quantize_int4(torch.zeros(96, 48))
    with pytest.raises(InvalidArgument, match="multiple of 16"):
        quantize_int4(torch.zeros(40, 64))


@pytest.mark.parametrize("quantization", ["int8", "4bit"])
def test_quantizing_a_model_touches_exactly_what_the_planner_prices(tiny_model_dir: Path, quantization: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = quantize_linears(model, quantization)
    facts = read_facts(str(tiny_model_dir))
    assert report.params == facts.quantizable_params and report.kept == {}
    assert report.layers == 7 * facts.layers  # q, k, v, o, gate, up, down
    left = dict(model.named_parameters())
    # embeddings, norms and the LM head are untouched; the layers' Linear weights are gone (biases stay)
    assert all(torch.equal(left[name], before[name]) for name in left)
    assert {n for n in before if n not in left} == {n for n in before if ".layers." in n and n.endswith("_proj.weight")}
    expected = (DynamicInt8Linear if W8A8 else Int8Linear) if quantization == "int8" else Int4Linear
    assert report.kernel == ("onednn-w8a8" if W8A8 else "weight-only") if quantization == "int8" else True
    assert sum(isinstance(m, expected) for m in model.modules()) == report.layers
    with torch.inference_mode():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_4bit_leaves_a_linear_its_kernel_cannot_take_and_says_why() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].fits = _linear(64, 64, torch.float32)
    model.layers[0].odd = _linear(64, 48, torch.float32)
    model.head = _linear(64, 64, torch.float32)  # outside the layers: never quantized
    report = quantize_linears(model, "4bit")
    assert isinstance(model.layers[0].fits, Int4Linear) and type(model.layers[0].odd) is nn.Linear
    assert type(model.head) is nn.Linear
    assert report.layers == 1 and report.kept == {"width not a multiple of 32 (in) or 16 (out)": 1}
    assert quantize_linears(_single_layer(), "int8").layers == 1


def _single_layer() -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].proj = _linear(40, 48, torch.float32)  # int8 takes any width
    return model
