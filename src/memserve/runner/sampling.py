"""Per-request sampling inside transformers' continuous batching.

The library decides greedy-or-sample once per manager, so the engine's manager decodes by argmax and
these processors turn the rows that asked for sampling into Gumbel-max draws: temperature, then top_p,
then Gumbel noise, all per row. Rows that asked for greedy decoding (temperature 0, passed as top_p 0)
are left untouched, so their argmax is exactly ``generate``'s. Arguments travel as the library passes
them: one int32 row per processor, float32 bits viewed as int32 (:func:`as_int32`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)

if TYPE_CHECKING:
    from transformers.generation.continuous_batching.requests import FutureRequestState

__all__ = ["NucleusSampleProcessor", "SamplingProcessors", "TemperatureProcessor", "as_int32"]


def as_int32(values: list[float]) -> torch.Tensor:
    """The library passes processor arguments as int32 rows: float32 bits, viewed."""
    return torch.tensor(values, dtype=torch.float32, device="cpu").view(dtype=torch.int32)


def _in_static_graph(scores: torch.Tensor) -> bool:
    """Under CUDA-graph capture or compile, no host-side branch on tensor values is allowed."""
    capturing = scores.is_cuda and torch.cuda.is_current_stream_capturing()
    return bool(capturing) or torch.compiler.is_compiling()


class _FloatKwargProcessor(ContinuousBatchingLogitsProcessor):
    """A per-request float argument (``kwarg``), 0.0 when a request does not give one (a greedy row)."""

    kwarg = ""
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.zeros_like(int32_tensor, dtype=torch.float32).view(dtype=torch.int32))

    def prepare_tensor_args(self, requests_with_new_token: list[FutureRequestState]) -> torch.Tensor:
        return as_int32([r.state.logit_processor_kwargs.get(self.kwarg, 0.0) for r in requests_with_new_token])


class TemperatureProcessor(_FloatKwargProcessor):
    """Divides each sampled row by its temperature. Temperature 0 marks a greedy row, left untouched so
    that the manager's argmax is exactly ``generate``'s."""

    kwarg = "temperature"
    supported_kwargs: dict[str, type] = {"temperature": float}  # noqa: RUF012 - the library's declared shape

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        temperature = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        divisor = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        return scores / divisor.unsqueeze(-1)


class NucleusSampleProcessor(_FloatKwargProcessor):
    """Top-p, then Gumbel noise: the argmax of ``logits + Gumbel`` is a sample from ``softmax(logits)``.

    Sampling this way lets greedy and sampled rows share one argmax (the library samples all rows or
    none), costs one uniform draw per logit instead of a multinomial, and sorts only when a row asks
    for top_p < 1. ``top_p == 0`` marks a greedy row, which gets neither.
    """

    kwarg = "top_p"
    supported_kwargs: dict[str, type] = {"top_p": float}  # noqa: RUF012 - the library's declared shape

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        sampled = top_p > 0
        static = _in_static_graph(scores)
        if not static and not bool(sampled.any()):
            return scores
        if static or bool((sampled & (top_p < 1)).any()):
            scores = _top_p(scores, torch.where(sampled, top_p, torch.ones_like(top_p)))
        gumbel = -torch.log(-torch.log(torch.rand_like(scores)))  # rand 0 gives -inf, never +inf
        return torch.where(sampled.unsqueeze(-1), scores + gumbel, scores)


def _top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row nucleus filtering, as transformers' ``TopPLogitsWarper`` does it."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p).unsqueeze(-1)
    remove[..., -1:] = False  # always keep the most likely token
    remove = remove.scatter(-1, sorted_indices, remove)
    return scores.masked_fill(remove, -float("inf"))


class SamplingProcessors(ContinuousBatchingLogitsProcessorList):
    """The model's own processors (penalties and the like, as the library keeps them) plus ours."""

    def __init__(self, base: LogitsProcessorList) -> None:
        super().__init__(
            LogitsProcessorList([*base, TemperatureProcessor(), NucleusSampleProcessor()]),
            per_request_processors=False,
            drop_unsupported_processors=True,
        )
        # one int32 argument row per per-request processor; the library only counts the ones it converts
        self.tensors_required = sum(isinstance(p, ContinuousBatchingLogitsProcessor) for p in self.logits_processor)
