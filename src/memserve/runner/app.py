"""The runner's OpenAI-compatible HTTP app: one loaded model, its engine, and the OpenAI wire format.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as SSE or not),
``GET /v1/models``, ``GET /health``, ``GET /stats``, and the LoRA adapters on the base: ``POST /adapters``
(``{"name", "source"}``: read, check and install one; 200 with the adapter as ``/v1/models`` lists it) and
``DELETE /adapters/{name}`` (new requests on it get 404 at once; those in flight finish).

A request's ``model`` is the base's name, an adapter's name, or ``base:adapter``; the response names the
model as the request did. ``/v1/models`` lists the base, then each adapter with ``parent`` set to the base and
``root`` to its folder, as vLLM lists its LoRA modules.

Status codes, chosen to match what OpenAI answers and what the ``openai`` client expects:

- 400 ``invalid_request_error`` for every request the server cannot accept, validation errors
  included (never 422): malformed JSON, wrong types, missing fields, ``n`` > 1, unsupported fields,
  a prompt that leaves no room in the context. ``param`` names the field as ``messages[0].content``.
- 404 ``not_found_error`` for an unknown route or a ``model`` this runner does not serve.
- 429 ``rate_limit_error`` with ``Retry-After`` when the engine's queue is full.
- 500 ``api_error`` for anything unexpected; the server stays up.

Unsupported, refused with a 400 naming the field because ignoring them would change the answer:
``n`` > 1, several prompts in one request, ``logprobs``/``top_logprobs``, ``tools``/``functions``
(``tool_choice`` other than none/auto), ``response_format`` other than text, ``logit_bias``, non-zero
``frequency_penalty``/``presence_penalty``, ``echo``, ``suffix``, ``best_of`` > 1. Image parts sent to a
text-only model are a 400 naming the model (a vision-language model's completer is ``runner/vision.py``'s).
Unknown fields are ignored. Defaults: ``temperature`` 1.0 (OpenAI's), ``max_tokens`` all the
room the context leaves (not the legacy completions' 16). A prompt plus ``max_tokens`` past the context
is a 400 naming both numbers (as OpenAI and vLLM answer), and a prompt whose bytes alone prove it too long
is refused before it is tokenized.

A streamed response waits for the first token before sending headers, so a full queue is still a
429. An engine error after that is sent as ``data: {"error": ...}`` followed by ``data: [DONE]``.
Whatever way a response ends (finished, stop string, error, client gone, even during prefill), the
engine iterator is closed, which frees the sequence at once.

The app owns its engine for its lifetime: when the server shuts the app down (the ASGI lifespan), it
awaits ``engine.close()``, which stops the generation thread and fails the sequences still in flight
with GenerationFailed, so their responses end with an error instead of hanging.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from memserve.checkpoint.tokens import longest_token_bytes, max_prompt_bytes
from memserve.checkpoint.vision import no_images
from memserve.errors import (
    BodyTooSlow,
    ContextOverflow,
    InvalidArgument,
    MemserveError,
    ModelNotFound,
    Overloaded,
    UnsupportedMediaType,
    UnsupportedParameter,
)
from memserve.runner.text import IncrementalDetokenizer, StopStrings, TextPiece, text_pieces
from memserve.wire.events import AdapterSpec, Engine, GenerationRequest, QueueFull, TokenEvent
from memserve.wire.format import NOT_A_JSON_OBJECT
from memserve.wire.http import (
    SSE_DONE,
    EventStream,
    check_json_content_type,
    error_json,
    handles,
    install_error_handlers,
    json_object,
    parse_body,
    read_body,
    sse_event,
    until_disconnected,
)
from memserve.wire.routes import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    HEALTH,
    MODELS,
    RUNNER_ADAPTER_ADD,
    RUNNER_ADAPTER_REMOVE,
    RUNNER_ROUTES,
    STATS,
    describe,
)
from memserve.wire.schema import ChatCompletionRequest, CompletionRequest, FinishReason, ResponseShape, Usage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from memserve.runner.lora import LoraBank

__all__ = ["ContextOverflow", "Overloaded", "UnsupportedParameter", "create_app"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request does not say
CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads it, the client is gone
# A runner takes what its gateway let through (the gateway's max_body_bytes, 16 MiB by default); this only bounds
# what a client talking to the runner directly can make it hold.
MAX_BODY_BYTES = 1 << 30


def create_app(
    *,
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    model_name: str,
    context_tokens: int,
    health: Callable[[], dict[str, Any]],
    stop_token_ids: tuple[int, ...] | None = None,
    completer_type: type[_Completer] | None = None,
    adapters: LoraBank | None = None,
) -> FastAPI:
    """The runner's FastAPI app.

    ``stop_token_ids`` adds to the tokenizer's eos (pass the generation config's eos ids); the engine
    ends a sequence after emitting one. ``health`` is called on every ``GET /health``. ``adapters`` is the
    engine's LoRA bank (``engine.attach_lora``), whose adapters the app lists, adds and removes. The app's
    lifespan shutdown awaits ``engine.close()``.
    """
    if context_tokens < 1:
        raise InvalidArgument(f"context_tokens must be at least 1, got {context_tokens}")
    eos = [tokenizer.eos_token_id] if isinstance(tokenizer.eos_token_id, int) else []
    completer = (completer_type or _Completer)(
        engine,
        tokenizer,
        model_name,
        context_tokens,
        tuple(dict.fromkeys([*eos, *(stop_token_ids or ())])),
        adapters,
    )
    created = int(time.time())

    app = FastAPI(title=f"memserve runner: {model_name}", lifespan=closing_lifespan(engine))
    install_error_handlers(app, serves=f"this runner serves {describe(RUNNER_ROUTES)}")

    @handles(app, CHAT_COMPLETIONS)
    async def chat_completions(request: Request) -> Response:
        return await completer.complete(request, ChatCompletionRequest)

    @handles(app, COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await completer.complete(request, CompletionRequest)

    def adapter_model(info: Any) -> dict[str, Any]:
        return {
            "id": info.name,
            "object": "model",
            "created": created,
            "owned_by": "memserve",
            "parent": model_name,
            "root": info.source,
            "context_tokens": context_tokens,
            "adapter": info.to_json(),
        }

    @handles(app, MODELS)
    async def models() -> dict[str, Any]:
        model = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "memserve",
            "parent": None,
            "context_tokens": context_tokens,
        }
        listed = [adapter_model(info) for info in adapters.info()] if adapters is not None else []
        return {"object": "list", "data": [model, *listed]}

    @handles(app, RUNNER_ADAPTER_ADD)
    async def add_adapter(body: AdapterSpec) -> dict[str, Any]:
        if adapters is None:
            raise InvalidArgument("this runner's engine takes no LoRA adapters", param="name")
        if body.name == model_name:
            raise InvalidArgument(
                f"an adapter cannot be named {body.name}, the base model's own name; pick another", param="name"
            )
        # read from disk and checked off the loop, so streams in flight keep flowing
        info = await anyio.to_thread.run_sync(adapters.add, body.name, body.source)
        return adapter_model(info)

    @handles(app, RUNNER_ADAPTER_REMOVE)
    async def remove_adapter(name: str) -> dict[str, Any]:
        if adapters is None:
            raise ModelNotFound(f"this runner has no LoRA adapters, so none named {name}", param="name")
        info = adapters.remove(name)
        return {"id": info.name, "object": "model", "parent": model_name, "deleted": True}

    @handles(app, HEALTH)
    async def health_route() -> dict[str, Any]:
        return {**health(), "engine": engine.name}

    @handles(app, STATS)
    async def stats() -> dict[str, Any]:
        return dataclasses.asdict(engine.stats())

    return app


def closing_lifespan(engine: Any) -> Callable[[FastAPI], Any]:
    """An app lifespan that awaits ``engine.close()`` at shutdown (every runner app owns its engine)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.close()

    return lifespan


def chat_text(template_owner: Any, body: ChatCompletionRequest) -> str:
    """The request's messages through the chat template of a tokenizer or processor, as text; a template that
    refuses them is a 400."""
    try:
        text = template_owner.apply_chat_template(body.template_messages(), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template's raise_exception, or a tokenizer without a template
        raise InvalidArgument(f"the chat template rejected these messages: {exc}", param="messages") from exc
    if not isinstance(text, str):
        raise MemserveError(f"internal error: apply_chat_template returned {type(text).__name__}, not text")
    return text


class _Completer:
    """Turns a request's body into prompt ids, an engine request, and an HTTP response.

    ``preparing`` is held from reading a body to its engine request: a no-op here, a lock for a completer whose
    bodies are large (``runner/vision.py``: images), so that one such body at a time is in memory. Such a
    completer sets ``body_seconds``: a body that has not arrived by then is a 408, so a slow client holds the
    others up no longer than that."""

    preparing: AbstractAsyncContextManager[Any] = nullcontext()
    body_seconds: float | None = None

    def __init__(
        self,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        context_tokens: int,
        stop_token_ids: tuple[int, ...],
        adapters: LoraBank | None = None,
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_tokens = context_tokens
        self.stop_token_ids = stop_token_ids
        self.max_prompt_bytes = max_prompt_bytes(context_tokens, longest_token_bytes(tokenizer.get_vocab()))

    def encode(self, text: str, body: ChatCompletionRequest | CompletionRequest, *, special: bool) -> list[int]:
        """Token ids of ``text``, refused unread when its bytes alone prove it overflows the context: a
        tokenizer given 1 MiB of text holds hundreds of MiB of offsets and pieces at once."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_prompt_bytes:
            raise ContextOverflow(
                f"the prompt is {size} bytes, more than this model's context of {self.context_tokens} tokens can "
                f"hold (at most {self.max_prompt_bytes} bytes even in its longest tokens); shorten the prompt",
                param=body.prompt_param,
            )
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    # Tokenizer calls stay on the event loop thread: a fast tokenizer used from two threads at once
    # can fail with "Already borrowed", and even long prompts encode in milliseconds.
    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        return self.encode(chat_text(self.tokenizer, body), body, special=False)

    def text_prompt(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            return self.encode(body.prompt, body, special=True)
        vocab = len(self.tokenizer)
        bad = [t for t in body.prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}", param="prompt")
        return body.prompt

    def check(self, body: ChatCompletionRequest | CompletionRequest) -> str | None:
        """Refuse what this runner cannot answer faithfully, before any tokenizing; the request's adapter
        (None: the base), from ``model``: the base's name, an adapter's, or ``base:adapter``."""
        unsupported = body.unsupported()
        if unsupported is not None:
            raise UnsupportedParameter(unsupported[1], param=unsupported[0])
        if isinstance(body, ChatCompletionRequest):
            self.check_images(body)
        if body.model == self.model_name:
            return None
        base, colon, adapter = body.model.rpartition(":")
        if not colon:
            base, adapter = self.model_name, body.model
        names = self.adapters.names() if self.adapters is not None else []
        if base == self.model_name and adapter in names:
            return adapter
        served = ", ".join([f"'{self.model_name}'", *(f"'{n}'" for n in names)])
        raise ModelNotFound(
            f"this runner serves the model '{self.model_name}'"
            + (f" and its adapters ({', '.join(names)}, also as '{self.model_name}:NAME')" if names else "")
            + f", not '{body.model}'; send one of {served}, or ask the gateway for the other model",
            param="model",
        )

    def check_images(self, body: ChatCompletionRequest) -> None:
        """A text-only model takes no images (the gateway's door refuses the same before any load);
        a vision-language model's completer (``runner/vision.py``) checks them instead."""
        refused = no_images(self.model_name, body.images())
        if refused is not None:
            raise refused

    def engine_request(
        self,
        request_id: str,
        body: ChatCompletionRequest | CompletionRequest,
        prompt_ids: list[int],
        adapter: str | None = None,
    ) -> GenerationRequest:
        """The request in the engine's terms; a prompt and ``max_tokens`` that overflow the context are a 400."""
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty; send at least one token of text", param="prompt")
        body.check_fits(self.context_tokens, prompt_tokens=len(prompt_ids))
        room = self.context_tokens - len(prompt_ids)
        temperature = body.temperature if body.temperature is not None else DEFAULT_TEMPERATURE
        top_p = body.top_p if body.top_p is not None else 1.0
        if top_p == 0:  # nothing may be sampled but the most likely token
            temperature, top_p = 0.0, 1.0
        return GenerationRequest(
            request_id=request_id,
            prompt_ids=tuple(prompt_ids),
            max_new_tokens=body.max_new_tokens or room,
            temperature=temperature,
            top_p=top_p,
            seed=body.seed,
            stop_token_ids=self.stop_token_ids,
            adapter=adapter,
        )

    async def complete(self, request: Request, kind: type[ChatCompletionRequest | CompletionRequest]) -> Response:
        async with self.preparing:
            # the body's bytes and parsed JSON are let go as soon as it is validated, and what it still holds
            # that the answer does not need (an image's data URL) once the prompt is built
            body = parse_body(kind, await _json_request(request, self.body_seconds))
            adapter = self.check(body)
            if isinstance(body, ChatCompletionRequest):
                prompt_ids, shape = self.chat_prompt(body), ResponseShape(chat=True, model=body.model)
            else:
                prompt_ids, shape = self.text_prompt(body), ResponseShape(chat=False, model=body.model)
            generation = self.engine_request(shape.id, body, prompt_ids, adapter)
        if not body.stream:
            answer = await until_disconnected(request.receive, self._collect(generation, body.stop))
            if answer is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            text, finish_reason, completion_tokens = answer
            usage = Usage(len(prompt_ids), completion_tokens)
            return JSONResponse(shape.response(text, finish_reason, usage))
        # wait for the first token before sending headers, so a full queue is still a real 429
        sequence = await until_disconnected(request.receive, _start(self.engine, generation))
        if sequence is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        pieces = self._pieces(sequence, body.stop)
        events = _sse_events(sequence, pieces, shape, len(prompt_ids), include_usage=body.include_usage)
        return EventStream(events, on_close=sequence.aclose)

    def _pieces(self, sequence: _Sequence, stop: list[str]) -> AsyncGenerator[TextPiece, None]:
        return text_pieces(sequence, IncrementalDetokenizer(self.tokenizer), StopStrings(stop))

    async def _collect(self, generation: GenerationRequest, stop: list[str]) -> tuple[str, FinishReason, int]:
        sequence = await _start(self.engine, generation)
        parts: list[str] = []
        finish_reason: FinishReason = "stop"
        completion_tokens = 0
        try:
            async with aclosing(self._pieces(sequence, stop)) as pieces:
                async for piece in pieces:
                    parts.append(piece.text)
                    finish_reason = piece.finish_reason or finish_reason
                    completion_tokens = piece.completion_tokens
        finally:
            await sequence.aclose()
        return "".join(parts), finish_reason, completion_tokens


class _Sequence:
    """One engine sequence with its first event already in hand; closes the engine iterator exactly once."""

    def __init__(self, events: AsyncIterator[TokenEvent], first: TokenEvent | None) -> None:
        self._events = events
        self._first = first
        self._exhausted = first is None
        self._closed = False

    def __aiter__(self) -> _Sequence:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._exhausted or self._closed:
            raise StopAsyncIteration
        return await anext(self._events)

    async def aclose(self) -> None:
        """Free the sequence in the engine; shielded, so a cancelled response still frees it."""
        if self._closed:
            return
        self._closed = True
        await _aclose(self._events)


async def _json_request(request: Request, seconds: float | None = None) -> Any:
    """The body parsed as JSON, as FastAPI reads a body parameter (without a Content-Type too; another media type
    is a 400), read without the copy ``request.body()`` keeps on the request; a body not in within ``seconds``
    is a 408 (``BodyTooSlow``)."""
    declared = request.headers.get("content-type")
    try:
        async with asyncio.timeout(seconds):
            raw = await read_body(request, MAX_BODY_BYTES)
    except TimeoutError:
        raise BodyTooSlow(
            f"the request body did not arrive within {seconds:g} s; this runner reads one large body at a time, so "
            "a slow one would hold the others up: send the whole body at once, or go through the gateway, which "
            "reads bodies before it relays them"
        ) from None
    if declared is not None:
        try:
            check_json_content_type(declared)
        except UnsupportedMediaType:
            raise InvalidArgument(NOT_A_JSON_OBJECT) from None
    return json_object(raw)


async def _aclose(events: AsyncIterator[TokenEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


async def _start(engine: Engine, generation: GenerationRequest) -> _Sequence:
    """Submit a sequence and wait for its first event; a full queue becomes ``Overloaded`` (429)."""
    try:
        events = engine.generate(generation)
        try:
            first: TokenEvent | None = await anext(events)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await _aclose(events)
            raise
    except QueueFull as exc:
        raise Overloaded(
            f"the runner is at capacity ({exc.running} sequences running, {exc.waiting} waiting); "
            f"retry in {exc.retry_after_seconds:g} s",
            retry_after_seconds=exc.retry_after_seconds,
        ) from exc
    return _Sequence(events, first)


async def _sse_events(
    sequence: _Sequence,
    pieces: AsyncGenerator[TextPiece, None],
    shape: ResponseShape,
    prompt_tokens: int,
    *,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    """The SSE body: role chunk, text deltas, finish chunk, optional usage chunk, ``[DONE]``."""
    if shape.chat:
        yield sse_event(shape.chunk(role=True))
    try:
        finish_reason: FinishReason = "stop"
        completion_tokens = 0
        try:
            async with aclosing(pieces):
                async for piece in pieces:
                    if piece.text:
                        yield sse_event(shape.chunk(text=piece.text))
                    finish_reason = piece.finish_reason or finish_reason
                    completion_tokens = piece.completion_tokens
        finally:
            await sequence.aclose()  # at once, before the closing chunks
        yield sse_event(shape.chunk(finish_reason=finish_reason))
        if include_usage:
            yield sse_event(shape.usage_chunk(Usage(prompt_tokens, completion_tokens)))
    except Exception as exc:  # headers are sent: the error must travel in the stream
        logger.exception("generation %s failed mid-stream", shape.id)
        yield sse_event(error_json(exc))
    yield SSE_DONE
