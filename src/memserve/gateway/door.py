"""The door: everything a runner would refuse in a request, checked before the pool leases, loads or evicts."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path
from typing import Any

from memserve.checkpoint.encoders import EncoderFacts, local_encoder_facts
from memserve.checkpoint.facts import read_config
from memserve.checkpoint.locate import read_facts
from memserve.checkpoint.tokens import (
    max_prompt_bytes,
    prompt_tokens_at_least,
    tokenizer_file,
    tokenizer_file_longest_token_bytes,
)
from memserve.checkpoint.vision import VisionFacts, no_images, takes_images
from memserve.config import Settings
from memserve.errors import InvalidArgument, MemserveError, UnsupportedParameter
from memserve.memory.fit import default_context
from memserve.pool.pool import ModelPool
from memserve.wire.encoders import (
    ClassifyRequest,
    EmbeddingRequest,
    EncoderRequest,
    check_encoder_request,
    encoder_route,
)
from memserve.wire.http import parse_body
from memserve.wire.images import load_images
from memserve.wire.routes import ENCODER_ROUTES
from memserve.wire.schema import ChatCompletionRequest, CompletionRequest

ENCODER_PATHS = frozenset(route.path.removeprefix("/v1") for route in ENCODER_ROUTES)


class Door:
    """Everything a runner would refuse in a request, checked before the pool leases, loads or evicts.

    The body is validated with the runner's own request models (``memserve.wire.schema``), so bad input
    never waits for memory, never evicts a model and never gets a 5xx. The prompt is also measured
    against the model's context: in tokens when they are given, else in bytes against the vocabulary's
    longest piece (``checkpoint.tokens``), which proves a 1 MiB prompt too long without a tokenizer. A prompt
    those bytes do not prove too long, but long enough that it may be, is counted with the checkpoint's
    ``tokenizer.json`` when the model has no runner (its load would be for nothing, and might evict another):
    a bound from below (``prompt_tokens_at_least``), so only a prompt sure to overflow is refused. The
    context is the loaded plan's, else the configured one, else the checkpoint's default; the runner
    checks again in tokens, exactly.
    """

    def __init__(self, settings: Settings, pool: ModelPool) -> None:
        self.settings = settings
        self.pool = pool
        self._facts: dict[str, tuple[int | None, int | None]] = {}  # name → (default context, longest token)
        # name → None when its images go on (memserve reads them, vLLM does, or the source is no local folder: its
        # load decides), else its config.json, which the 400 names the model by
        self._no_images: dict[str, dict[str, Any] | None] = {}
        self._encoders: dict[str, EncoderFacts | None] = {}
        self._tokenizers: dict[str, Any | None] = {}  # name → its tokenizer.json, loaded the first time one counts

    async def check(self, model: str, path: str, body: dict[str, Any]) -> bool | None:
        """Validate ``body`` for local ``model``; its ``stream`` flag when it passes, InvalidArgument if not."""
        encoder = await self._encoder(model)
        if path in ENCODER_PATHS or encoder is not None:
            await self._check_encoder(model, path, body, encoder)
            return False
        schema = ChatCompletionRequest if path == "/chat/completions" else CompletionRequest
        request = parse_body(schema, body)
        unsupported = request.unsupported()
        if unsupported is not None:
            raise UnsupportedParameter(unsupported[1], param=unsupported[0])
        if isinstance(request, ChatCompletionRequest) and request.images():
            await self._check_images(model, request, body)
        context, longest = await self._limits(model)
        if context is not None:
            ids = request.prompt if isinstance(request, CompletionRequest) else None
            prompt_tokens = len(ids) if isinstance(ids, list) else None
            request.check_fits(context, prompt_tokens=prompt_tokens, longest_token_bytes=longest)
            if prompt_tokens is None and request.prompt_text_bytes() + (request.max_new_tokens or 1) >= context:
                counted = await self._count(model, request.prompt_texts())
                request.check_fits(context, longest_token_bytes=longest, counted_at_least=counted)
        return request.stream

    async def _count(self, model: str, texts: list[str]) -> int | None:
        """At least how many tokens ``texts`` take (``prompt_tokens_at_least``), counted only for a model with no
        runner and a local ``tokenizer.json``: a runner counts exactly, and quickly."""
        entry = self.pool.entries.get(model)
        if entry is not None and entry.runner is not None:
            return None
        if model not in self._tokenizers:
            config = self.settings.model(model)
            assert config is not None  # route() found it
            folder = Path(config.source).expanduser()
            self._tokenizers[model] = await asyncio.to_thread(tokenizer_file, folder) if folder.is_dir() else None
        tokenizer = self._tokenizers[model]
        if tokenizer is None:
            return None
        return await asyncio.to_thread(prompt_tokens_at_least, tokenizer, texts)

    async def _encoder(self, model: str) -> EncoderFacts | None:
        """The model's encoder facts (an embedding model or a classifier), None for a generating model."""
        if model not in self._encoders:
            config = self.settings.model(model)
            assert config is not None  # route() found it
            self._encoders[model] = await asyncio.to_thread(local_encoder_facts, config.source)
        return self._encoders[model]

    async def _check_encoder(self, model: str, path: str, body: dict[str, Any], facts: EncoderFacts | None) -> None:
        """An encoder takes only its own route; a generating model takes neither encoder route."""
        if facts is None:
            raise InvalidArgument(
                f"the model '{model}' generates text: it answers /v1/chat/completions and /v1/completions, not "
                f"/v1{path}; send it to an embedding model or a classifier",
                param="model",
            )
        if path not in ENCODER_PATHS:
            raise InvalidArgument(
                f"the model '{model}' is {'an embedding model' if facts.task == 'embed' else 'a classifier'}: "
                f"send its requests to {encoder_route(facts.task)}, not POST /v1{path}",
                param="model",
            )
        request: EncoderRequest = (
            parse_body(EmbeddingRequest, body) if path == "/embeddings" else parse_body(ClassifyRequest, body)
        )
        _, longest = await self._limits(model)
        limit = max_prompt_bytes(facts.max_tokens, longest) if longest else None
        check_encoder_request(request, facts, model=model, max_text_bytes=limit)

    async def _check_images(self, model: str, request: ChatCompletionRequest, body: dict[str, Any]) -> None:
        """A text-only model takes none (400 naming it); else every image within the caps, decoded as far as its
        header. An http(s) image (``image_urls: allow``) is fetched here and put in ``body`` as a data URL, so a
        runner never reaches the network."""
        images = request.images()
        config = self.settings.model(model)
        assert config is not None  # route() found it
        if model not in self._no_images:
            text_only = await asyncio.to_thread(_local_text_only, config.source)
            vllm_reads = config.runner == "vllm" and text_only is not None and takes_images(text_only)
            self._no_images[model] = None if vllm_reads else text_only  # vLLM reads the towers memserve does not
        refused_for = self._no_images[model]
        if refused_for is not None:
            refused = no_images(model, images, refused_for)
            assert refused is not None
            raise refused
        decoded = await load_images(images, config.images.limits(allow_urls=self.settings.image_urls == "allow"))
        fetched = [(ref, image) for ref, image in zip(images, decoded, strict=True) if ref.url[:5].lower() != "data:"]
        if fetched:
            # new messages, parts and image_urls where they change (the app relays body): the client's are left as
            # they came, and nothing else is copied (a deep copy also recursed into whatever else a message held)
            body["messages"] = messages = list(body["messages"])
            for ref, image in fetched:
                m, p = (int(i) for i in re.findall(r"\[(\d+)\]", ref.param))
                url = f"data:image/{image.format.lower()};base64,{base64.b64encode(image.data).decode()}"
                content = list(messages[m]["content"])
                content[p] = {**content[p], "image_url": {"url": url}}
                messages[m] = {**messages[m], "content": content}

    async def _limits(self, model: str) -> tuple[int | None, int | None]:
        """(context, longest token bytes): the running plan's context, else the configured or default one."""
        config = self.settings.model(model)
        assert config is not None  # route() found it
        if model not in self._facts:
            self._facts[model] = await asyncio.to_thread(_local_limits, config.source)
        default_context, longest = self._facts[model]
        entry = self.pool.entries.get(model)
        if entry is not None and entry.runner is not None and entry.plan is not None:
            return entry.plan.context_tokens, longest
        return config.context_tokens or default_context, longest


def _local_text_only(source: str) -> dict[str, Any] | None:
    """The ``config.json`` of a local checkpoint folder memserve serves as text (a text-only model, or a
    vision-language one whose tower it does not price: ``VisionFacts``), None for one whose images it reads; a
    source that is not a folder is left to its load."""
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        return None
    try:
        config = read_config(folder, source=source)
    except MemserveError:
        return None  # the load will say what is wrong with it
    return None if VisionFacts.from_config(config) is not None else config


def _local_limits(source: str) -> tuple[int | None, int | None]:
    """(default context, longest token bytes) of a local checkpoint folder; (None, None) for anything else."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return None, None
    try:
        context: int | None = default_context(read_facts(str(folder)))
    except MemserveError:
        context = None  # the load will say what is wrong with it
    return context, tokenizer_file_longest_token_bytes(folder)


__all__ = ["Door"]
