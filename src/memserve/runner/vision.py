"""Serving a vision-language checkpoint (the plan's engine ``image-text``): images in chat, text out.

The checkpoint's own processor turns a request into model inputs, as the model card's example does:
the chat template places one image marker per image part, and ``processor(images=..., text=...)`` expands
each marker to the image's tokens and turns the images into ``pixel_values``. The model is loaded with
``AutoModelForImageTextToText`` and served by :class:`ImageTextEngine`, the ``generate`` engine
(``runner/fallback.py``) with each row's image tensors passed along: transformers' ``generate`` encodes the
images once before the prefill (``mm_encoder_outputs``), so the prefill is chunked by the plan's
``max_batch_tokens`` as for text. Requests that decode alike and whose image tensors stack are batched into one
``generate`` call (images concatenated in row order, where the model's placeholder tokens expect them);
others wait for a call of their own. A tiling processor's tensors (Idefics3/SmolVLM: ``pixel_values`` of
``(rows, tiles, 3, H, W)`` with a ``pixel_attention_mask``) stack whatever the rows' tile counts: they are padded
with empty tiles as the processor pads a batch, and the model drops those before its tower.

:class:`ImageCompleter` is the runner app's completer for such a model (``runner/app.py``): it decodes each
``data:`` image (``wire/images.py``: the same caps as the gateway's door; the runner never fetches a URL,
the gateway inlines those it may fetch) and runs the processor on the event loop's thread, as text
prompts are tokenized there. Continuous batching is not used: transformers' paged path takes token ids only.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from memserve.errors import ContextOverflow, InvalidArgument
from memserve.memory.estimate import IMAGE_TEXT
from memserve.runner.app import _Completer, chat_text
from memserve.runner.fallback import GenerateEngine
from memserve.runner.front import WARMUP_REQUEST, Job, filler_prompt, worst_case_prompt_tokens
from memserve.wire.events import Engine, GenerationRequest
from memserve.wire.http import EventStream
from memserve.wire.images import DecodedImage, ImageLimits, check_images, decode_data_url, open_rgb
from memserve.wire.schema import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from fastapi import Request, Response
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

    from memserve.memory.fit import PlanFile
    from memserve.runner.load import LoadReport
    from memserve.runner.lora import LoraBank

__all__ = ["IMAGE_TEXT", "ImageCompleter", "ImageGenerationRequest", "ImageTextEngine", "load_image_text"]

PADDED_BATCH_KEY = "pixel_attention_mask"
"""Inputs with this key come from a processor that pads its images to one shape per batch (Idefics3's, Idefics2's):
zero pixels and a False mask, which the model reads as padding (an all-zero tile is dropped before its tower)."""
BODY_SECONDS_ENV = "MEMSERVE_IMAGE_BODY_SECONDS"
BODY_SECONDS = 30.0
"""How long an image runner waits for one request's body (``BODY_SECONDS_ENV`` sets another): it reads one body
at a time, so a client that sends slowly holds the others up, at most this long. 25.6 MiB (4 images at the caps)
takes 2 s at 100 Mbit/s; the gateway reads a body whole before it relays it, so through it a body arrives at once."""


@dataclass(frozen=True)
class ImageGenerationRequest(GenerationRequest):
    """A generation request with the processor's image tensors (``pixel_values`` and friends) for its prompt."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, hash=False)


class ImageTextEngine(GenerateEngine):
    """The ``generate`` engine for a vision-language model: each row's image tensors go with its token ids.

    ``processor`` stays with the engine (the app's completer reads it), and the worst-case warm-up sends the
    most images a request may carry (``limits.max_images``), each at the largest size the caps admit.
    ``held_requests`` is how many prepared requests (their pixel values) the plan priced: the completer
    prepares no more than that at once.
    """

    name: str = IMAGE_TEXT

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        limits: ImageLimits | None = None,
        held_requests: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.processor = processor
        self.limits = limits or ImageLimits()
        super().__init__(model, **kwargs)
        self.held_requests = held_requests or self.max_sequences + self.max_queue

    @staticmethod
    def _decoding(request: GenerationRequest) -> Any:
        """Rows batch when they decode alike and their image tensors concatenate: the same shape past the first
        dimension, or for a padding processor's (``PADDED_BATCH_KEY``) the same number of dimensions, as it pads
        them to the largest; a row with images never shares a call with a row without."""
        key = GenerateEngine._decoding(request)
        if key is None:
            return None
        inputs = request.inputs if isinstance(request, ImageGenerationRequest) else {}
        padded = PADDED_BATCH_KEY in inputs
        shapes = tuple(sorted((k, v.dim() if padded else tuple(v.shape[1:]), str(v.dtype)) for k, v in inputs.items()))
        return (key, shapes)

    def warm_up_worst_case(self) -> dict[str, Any]:
        """One sequence with the most images a request may carry, filled with text to the largest prefill chunk
        (:func:`worst_case_prompt_tokens`), generating one token: the vision tower's largest forward, the image
        features held through the prefill, and the processor's decoded images, all at once."""
        started = time.perf_counter()
        tokens = worst_case_prompt_tokens(self.model, self.max_context_tokens or 2, self.max_batch_tokens)
        images, inputs = _worst_case_images(self.processor, self.limits, tokens)
        prompt = list(inputs.pop("input_ids")[0].tolist())
        inputs.pop("attention_mask", None)
        if len(prompt) < tokens:  # text that is no image marker: a marker without its image fails the forward
            avoid = (*self._default_stop_ids, *_marker_ids(self.model))
            prompt += filler_prompt(tokens - len(prompt), self._vocab_size, avoid)
        request = ImageGenerationRequest(
            request_id=WARMUP_REQUEST.request_id, prompt_ids=tuple(prompt), max_new_tokens=1, inputs=inputs
        )
        job = Job(request=request, key="warmup", loop=cast(Any, None), stop_ids=frozenset(), accepted_at=0.0)
        self._generate_rows([job], post=lambda job, tokens: None)
        return {
            "prompt_tokens": len(prompt),
            "images": images,
            "measured_sequences": 1,
            "touched_bytes": 0,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _model_inputs(self, batch: list[Job], config: Any) -> dict[str, torch.Tensor]:
        """The rows' image tensors, concatenated in row order (where their placeholder tokens expect them); a
        model that does not encode images before the prefill gets no prefill chunks (raw pixels cannot be cut)."""
        extra = _stacked([job.request for job in batch], self.model.device, self.model.dtype)
        if extra and not _encodes_before_prefill(self.model):
            config.prefill_chunk_size = None
        return extra


def _marker_ids(model: Any) -> tuple[int, ...]:
    """The ids a processor puts where image or video features go (LLaVA's ``image_token_id``, ...)."""
    config = model.config
    ids = (getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id"))
    return tuple(i for i in ids if isinstance(i, int))


def _encodes_before_prefill(model: Any) -> bool:
    supports = getattr(model, "_supports_mm_encoder_outputs", None)
    return bool(supports()) if callable(supports) else False


def _stacked(requests: list[GenerationRequest], device: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The rows' image tensors, each key concatenated over the rows that have it (floats in the model's dtype);
    parts of different shapes (a padding processor's, ``_decoding``) padded at the end of each dimension with
    zeros (False), as the processor pads a batch."""
    keys = sorted({k for r in requests if isinstance(r, ImageGenerationRequest) for k in r.inputs})
    stacked: dict[str, torch.Tensor] = {}
    for key in keys:
        parts = [r.inputs[key] for r in requests if isinstance(r, ImageGenerationRequest) and key in r.inputs]
        tensor = _concatenated(parts).to(device)
        stacked[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return stacked


def _concatenated(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated on their first dimension, each padded with zeros to the largest in the others."""
    if len({part.shape[1:] for part in parts}) == 1:
        return torch.cat(parts, dim=0)
    size = [max(part.shape[d] for part in parts) for d in range(1, parts[0].dim())]
    out = parts[0].new_zeros((sum(part.shape[0] for part in parts), *size))
    row = 0
    for part in parts:
        out[(slice(row, row + part.shape[0]), *(slice(0, n) for n in part.shape[1:]))] = part
        row += part.shape[0]
    return out


def _worst_case_images(processor: Any, limits: ImageLimits, tokens: int) -> tuple[int, dict[str, Any]]:
    """The processor's inputs for as many of the largest images as a request may carry and the prompt holds."""
    from PIL import Image

    marker = getattr(processor, "image_token", None)
    side = int(limits.max_pixels**0.5)
    count = limits.max_images
    while count > 0:
        images = [Image.new("RGB", (side, side), (127, 127, 127)) for _ in range(count)]
        inputs = _held(processor(images=images, text=str(marker) * count, return_tensors="pt"))
        if marker is None or inputs["input_ids"].shape[1] <= tokens:
            return count, inputs
        count -= 1
    return 0, dict(processor(text=" ", return_tensors="pt"))


def _held(inputs: Any) -> dict[str, Any]:
    """The processor's tensors as a prepared request holds them: a tiling processor's ``pixel_attention_mask``
    (Idefics3's, int64) as bool, 8 times smaller while the request waits; the model reads it as a mask alike."""
    return {k: v.bool() if k == "pixel_attention_mask" else v for k, v in dict(inputs).items()}


class _PromptIds(list[int]):
    """Token ids of a prompt that carry the processor's image tensors from ``chat_prompt`` to ``engine_request``."""

    inputs: dict[str, torch.Tensor]


class ImageCompleter(_Completer):
    """The runner app's completer for a vision-language model: images are decoded, checked and processed with
    the text; the rest (context checks, streaming) is the text completer's."""

    def __init__(self, engine: Engine, tokenizer: PreTrainedTokenizerBase, *args: Any) -> None:
        super().__init__(engine, tokenizer, *args)
        image_engine = cast(ImageTextEngine, engine)
        self.processor = image_engine.processor
        self.limits = image_engine.limits
        # one body at a time from its bytes to its prompt: base64 images make bodies tens of MiB, and a burst of
        # them read at once would hold every one (memory/vision.py prices one body, and the inputs of each sequence)
        self.preparing = asyncio.Lock()
        self.body_seconds = float(os.environ.get(BODY_SECONDS_ENV) or BODY_SECONDS)
        # prepared requests hold their pixel values until they finish: no more of them than the plan priced, so
        # a max_queue beyond the default queue waits here, unread, instead of past the plan
        self.held = asyncio.Semaphore(image_engine.held_requests)
        self.markers = frozenset(_marker_ids(image_engine.model))

    async def complete(self, request: Request, kind: type[ChatCompletionRequest | CompletionRequest]) -> Response:
        """The text completer's answer, prepared only once fewer than ``held`` requests hold their inputs; the
        slot is given back when the answer ends (a stream's when it closes)."""
        await self.held.acquire()
        try:
            response = await super().complete(request, kind)
        except BaseException:
            self.held.release()
            raise
        if isinstance(response, EventStream):
            response.after_close(self._release)
        else:
            self.held.release()
        return response

    async def _release(self) -> None:
        self.held.release()

    def text_prompt(self, body: CompletionRequest) -> list[int]:
        """A completion takes no images, so its prompt may not hold the marker the model fills with an image's
        features (the model would read a placeholder with nothing behind it)."""
        prompt = super().text_prompt(body)
        held = sorted(self.markers.intersection(prompt))
        if held:
            names = ", ".join(f"{self.tokenizer.convert_ids_to_tokens(i)} (id {i})" for i in held)
            raise InvalidArgument(
                f"the prompt holds this model's image marker {names}, which stands for an image's features; "
                "/v1/completions takes no images: send images as image_url parts of a chat message, or leave the "
                "marker out",
                param="prompt",
            )
        return prompt

    def check_images(self, body: ChatCompletionRequest) -> None:
        """This model takes images: the count cap and the URL policy (a runner fetches none: the gateway inlines
        what it may fetch), before any bytes are decoded."""
        check_images(body.images(), self.limits)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        refs = body.images()
        decoded: list[DecodedImage] = [decode_data_url(ref, self.limits) for ref in refs]
        for message in body.messages:  # the request's copy of each URL is not needed again: a data URL may be MiBs
            for _, part in message.image_urls:
                part.url = ""
        text = chat_text(self.processor, body)
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_prompt_bytes:
            raise ContextOverflow(
                f"the prompt is {size} bytes, more than this model's context of {self.context_tokens} tokens can "
                f"hold (at most {self.max_prompt_bytes} bytes even in its longest tokens); shorten the prompt",
                param=body.prompt_param,
            )
        images = [open_rgb(image) for image in decoded]
        try:
            if images:
                inputs = _held(self.processor(images=images, text=text, return_tensors="pt"))
            else:
                inputs = _held(self.processor(text=text, return_tensors="pt"))
        except Exception as exc:  # what the processor cannot take (an image marker count that does not match)
            raise InvalidArgument(f"the processor rejected this request: {exc}", param="messages") from exc
        finally:
            for image in images:
                image.close()
        prompt = _PromptIds(inputs.pop("input_ids")[0].tolist())
        inputs.pop("attention_mask", None)
        prompt.inputs = inputs
        return prompt

    def engine_request(
        self,
        request_id: str,
        body: ChatCompletionRequest | CompletionRequest,
        prompt_ids: list[int],
        adapter: str | None = None,
    ) -> GenerationRequest:
        request = super().engine_request(request_id, body, prompt_ids, adapter)
        inputs = prompt_ids.inputs if isinstance(prompt_ids, _PromptIds) else {}
        if not inputs:
            return request
        fields = {name: getattr(request, name) for name in GenerationRequest.__dataclass_fields__}
        return ImageGenerationRequest(**fields, inputs=inputs)


def load_image_text(
    launch: PlanFile, report: LoadReport, *, limits: ImageLimits | None = None
) -> tuple[Any, Any, Any, LoraBank]:
    """Model, tokenizer, engine and LoRA bank for a vision-language plan: loaded, faulted in, the plan's adapters
    put on its language model (``language_model_scope``), warmed up and measured at its worst case
    (``runner/serve.py: fit_to_reservation``, which admits fewer sequences when it runs over), each phase
    reported as a text model's are. The caller attaches the bank to the engine once it is chosen."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from memserve.checkpoint.locate import locate
    from memserve.checkpoint.vision import language_model_scope
    from memserve.memory.planner import image_requests_held
    from memserve.runner.load import from_pretrained_kwargs, read_weights, record_phase, weight_bytes
    from memserve.runner.lora import LoraBank
    from memserve.runner.progress import LoadProgress

    plan = launch.plan
    limits = limits or plan.images  # the caps the plan priced (the model's images: setting)
    progress = LoadProgress.for_stderr()
    with progress:
        report.state = "loading"
        t = time.perf_counter()
        progress.phase_started("resolve")
        located = locate(launch.source)
        if located.path is None:
            raise InvalidArgument(f"{launch.source} is not available locally; download it first (hf download)")
        record_phase(report, progress, "resolve", t, path=str(located.path))

        t = time.perf_counter()
        progress.phase_started("map")
        model = AutoModelForImageTextToText.from_pretrained(located.path, **from_pretrained_kwargs(plan))
        model.eval()
        processor = AutoProcessor.from_pretrained(located.path)
        record_phase(report, progress, "map", t, dtype=plan.dtype, quantization=plan.quantization)

        t = time.perf_counter()
        progress.phase_started("fault_in", total_bytes=weight_bytes(model))
        read_weights(model, progress)
        record_phase(report, progress, "fault_in", t)
        bank = LoraBank(model, scope=language_model_scope(model))  # before the warm-up, which faults them in too
        for adapter, adapter_source in launch.adapters:
            bank.add(adapter, adapter_source)

        report.state = "warming"
        t = time.perf_counter()
        progress.phase_started("warm_up")

        def build(sequences: int) -> ImageTextEngine:
            return ImageTextEngine(
                model,
                processor,
                limits=limits,
                held_requests=image_requests_held(plan.concurrency),
                max_sequences=sequences,
                max_queue=launch.queue + plan.concurrency - sequences,
                max_context_tokens=plan.context_tokens,
                max_batch_tokens=plan.max_batch_tokens,
            )

        current = [build(plan.concurrency)]
        record_phase(report, progress, "warm_up", t)

    def rebuild(sequences: int) -> ImageTextEngine:
        """Fewer sequences at once (the worst case ran over): what the text engines do, as ``serve.py`` does."""
        asyncio.run(current[0].close())
        current[0] = build(sequences)
        return current[0]

    from memserve.runner.serve import fit_to_reservation

    return model, processor.tokenizer, fit_to_reservation(current[0], launch, report, rebuild), bank
