"""Prepacked bf16 Linears: same numbers as F.linear, tied weights left alone, file pages handed back."""

from __future__ import annotations

import io
import json
import mmap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from memserve.checkpoint.demo import write_demo_model
from memserve.runner.kernels import (
    ENV_SWITCH,
    PackedLinear,
    _FileMappings,
    _kept_ranges,
    pack_linear_weights,
    why_not_pack,
)
from tests.runner.fakes import cpu_plan

_probe = nn.Linear(8, 8, dtype=torch.bfloat16)
REASON = why_not_pack(_probe, env={})
needs_packing = pytest.mark.skipif(REASON is not None, reason=f"oneDNN packing unavailable: {REASON}")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def bf16_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bf16 demo model; qwen2 ties its embeddings and has q/k/v biases."""
    arch = request.param
    path = tmp_path_factory.mktemp("bf16") / arch
    return write_demo_model(path, size="tiny", arch=arch, dtype="bfloat16").path


def _load(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def _mapped_resident_bytes(directory: Path) -> int:
    """Resident bytes of this process's mappings of files under ``directory`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head[0]) > 8 and ":" not in head[0]:  # a mapping's first line
                inside = len(head) >= 6 and head[5].startswith(str(directory))
            elif inside and head[:1] == ["Rss:"]:
                total += int(head[1]) * 1024
    return total


@needs_packing
def test_packed_model_computes_exactly_what_the_plain_one_does(bf16_checkpoint: Path) -> None:
    plain, packed = _load(bf16_checkpoint), _load(bf16_checkpoint)
    linears = sum(isinstance(m, nn.Linear) for m in plain.modules())
    tied = plain.config.tie_word_embeddings

    report = pack_linear_weights(packed)

    assert report.skipped_reason is None
    assert report.layers == linears - (1 if tied else 0)  # a tied lm_head is the embedding: not packed twice
    assert isinstance(packed.lm_head, nn.Linear) is tied
    assert packed.lm_head.weight is packed.get_input_embeddings().weight or not tied
    ids = torch.randint(0, plain.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(packed(ids).logits, plain(ids).logits)
        expected = plain.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(packed.generate(ids, max_new_tokens=12, do_sample=False), expected)


@needs_packing
def test_packing_hands_back_the_checkpoints_mapped_pages(bf16_checkpoint: Path) -> None:
    model = _load(bf16_checkpoint)
    with torch.inference_mode():
        for p in model.parameters():
            p.sum()
    before = _mapped_resident_bytes(bf16_checkpoint)

    report = pack_linear_weights(model)

    after = _mapped_resident_bytes(bf16_checkpoint)
    assert report.released_file_bytes > 0
    assert before - after >= report.released_file_bytes * 0.9  # what it says it released really left RSS
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():  # the weights that stayed mapped (embeddings, norms, biases) are intact
        assert torch.equal(model(ids).logits, _load(bf16_checkpoint)(ids).logits)


def test_release_drops_only_whole_file_pages_nobody_else_reads(tmp_path: Path) -> None:
    page = mmap.PAGESIZE
    data = tmp_path / "weights.bin"
    data.write_bytes(bytes(range(256)) * (16 * page // 256))
    mapped = torch.from_file(str(data), shared=False, size=16 * page, dtype=torch.uint8)
    mapped.sum()
    mappings = _FileMappings.of_this_process()
    base = mapped.data_ptr()
    assert base % page == 0

    # one byte short of whole pages at both ends: only the 3 interior pages go
    assert mappings.release(base + 1, 5 * page - 2, keep=[]) == 3 * page
    # a range another tensor reads is kept
    assert mappings.release(base + 8 * page, 4 * page, keep=[(base + 10 * page, base + 10 * page + 1)]) == 0
    # a strided view reads far past numel * itemsize from its start: its written rows must survive
    written = mapped[12 * page :].view(4, page)[:, :8]
    written.fill_(7)  # private copies of the file's pages, which a drop would silently revert
    holder = nn.Module()
    holder.register_buffer("rows", written)
    keep = _kept_ranges(holder, packing=set())
    assert keep == [(base + 12 * page, base + 15 * page + 8)]
    assert mappings.release(base + 12 * page, 4 * page, keep=keep) == 0
    assert bool((written == 7).all())
    mapped[12 * page :].copy_(torch.frombuffer(bytearray(data.read_bytes()[12 * page :]), dtype=torch.uint8))
    # released pages read back from the file: nothing is lost
    assert torch.equal(mapped, torch.frombuffer(bytearray(data.read_bytes()), dtype=torch.uint8))

    anonymous = torch.arange(16 * page, dtype=torch.uint8)  # never dropped: there is no file to refill it
    assert mappings.release(anonymous.data_ptr(), anonymous.numel(), keep=[]) == 0
    assert torch.equal(anonymous, torch.arange(16 * page, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("module", "env", "reason"),
    [
        (nn.Linear(8, 8, dtype=torch.bfloat16), {ENV_SWITCH: "0"}, f"turned off by {ENV_SWITCH}"),
        (nn.Linear(8, 8), {}, "no bf16 Linear weights on cpu"),  # fp32: F.linear runs MKL, not oneDNN
        (nn.Embedding(8, 8, dtype=torch.bfloat16), {}, "no bf16 Linear weights on cpu"),
    ],
)
def test_why_not_pack_says_why(module: nn.Module, env: dict[str, str], reason: str) -> None:
    assert why_not_pack(module, env=env) == reason


def test_a_skipped_model_is_left_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SWITCH, "off")
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    report = pack_linear_weights(model)
    assert report.to_json() == {"kernel": "torch", "reason": f"turned off by {ENV_SWITCH}"}
    assert type(model[0]) is nn.Linear


@needs_packing
def test_packed_linear_matches_linear_on_any_leading_shape() -> None:
    linear = nn.Linear(32, 24, dtype=torch.bfloat16)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for shape in [(0, 32), (1, 32), (5, 32), (2, 7, 32)]:
            x = torch.randn(*shape).to(torch.bfloat16)
            assert torch.equal(packed(x), linear(x))
        strided = torch.randn(32, 6).to(torch.bfloat16).t()  # a transposed view, as attention code makes
        assert not strided.is_contiguous()
        assert torch.equal(packed(strided), linear(strided.contiguous()))


BF16_PLAN = cpu_plan("bfloat16")


@needs_packing
@pytest.mark.parametrize("switch", [None, "0"])
def test_a_runner_load_packs_bf16_and_says_so(
    bf16_checkpoint: Path, switch: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memserve.runner.load import LoadProgress, LoadReport, load_model

    if switch is None:
        monkeypatch.delenv(ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(ENV_SWITCH, switch)
    plan = BF16_PLAN
    stream = io.StringIO()
    report = LoadReport()
    model, _ = load_model(str(bf16_checkpoint), plan, report, progress=LoadProgress(stream=stream))

    packed = sum(isinstance(m, PackedLinear) for m in model.modules())
    fault_in = next(p for p in report.phases if p["phase"] == "fault_in")
    assert fault_in["linear"] == report.to_json()["linear"]
    if switch is None:
        assert packed > 0 and report.linear["kernel"] == "onednn-packed" and report.linear["layers"] == packed
        assert report.linear["released_file_bytes"] > 0 and report.linear["not_called"] == 0
    else:
        assert packed == 0 and report.linear == {"kernel": "torch", "reason": f"turned off by {ENV_SWITCH}"}
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert report.state == "ready" and [e["phase"] for e in events][-1] == "warm_up"
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, _load(bf16_checkpoint)(ids).logits)


class _ReadsAWeight(nn.Module):
    """Calls one Linear and does its own arithmetic with another's weight, as the mamba family does."""

    def __init__(self) -> None:
        super().__init__()
        self.called = nn.Linear(16, 16, dtype=torch.bfloat16)
        self.read = nn.Linear(16, 16, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.called(x) @ self.read.weight


@needs_packing
def test_only_the_linears_a_forward_calls_are_packed() -> None:
    model = _ReadsAWeight()
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.inference_mode():
        expected = model(x)

    report = pack_linear_weights(model, probe=lambda: model(x))

    assert (report.layers, report.not_called) == (1, 1)
    assert isinstance(model.called, PackedLinear) and type(model.read) is nn.Linear
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


@needs_packing
def test_a_forward_that_fails_once_packed_names_the_switch(
    bf16_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memserve.errors import MemserveError
    from memserve.runner.load import LoadProgress, LoadReport, load_model

    def broken(self: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mkldnn tensor used where a strided one was expected")

    monkeypatch.setattr(PackedLinear, "forward", broken)
    monkeypatch.setattr("memserve.runner.kernels._self_check", lambda: None)  # which would catch it first
    plan = BF16_PLAN
    with pytest.raises(MemserveError, match=f"after .* Linear weights were packed .* {ENV_SWITCH}=0"):
        load_model(str(bf16_checkpoint), plan, LoadReport(), progress=LoadProgress(stream=io.StringIO()))


@needs_packing
def test_a_build_whose_packed_linear_breaks_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("_linear_pointwise() takes 5 arguments")

    monkeypatch.setattr(PackedLinear, "forward", broken)
    reason = why_not_pack(nn.Linear(8, 8, dtype=torch.bfloat16), env={})
    assert reason is not None and reason.startswith("oneDNN linear packing failed here (TypeError: ")
