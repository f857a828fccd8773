"""The OpenAI wire shapes memserve speaks: request models in, response and chunk dicts out.

Torch-free: the gateway validates every request body with these models at its door (before it leases,
loads or evicts anything) and the runner validates with the same ones, so both answer alike.

Requests ignore fields they do not know (clients send many, e.g. vLLM's ``top_k``), but fields that
would change the answer and are not implemented are reported by ``unsupported()`` so the app can
refuse them with a 400 instead of silently answering something else. Types are strict, as OpenAI's
are: ``"stream": "true"`` or ``1`` is a 400, not a stream, and ``"max_tokens": "5"`` is a 400.

Union-typed fields (``content``, ``prompt``, ``stop``) are normalised in "before" validators that raise
one plain message, so a wrong type reads as "messages[0].content must be ..." rather than one pydantic
error per union member.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from memserve.errors import ContextOverflow

__all__ = [
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ErrorResponse",
    "FinishReason",
    "ImagePart",
    "ImageRef",
    "ImageURL",
    "ModelList",
    "ResponseShape",
    "StreamOptions",
    "TextCompletion",
    "TextPart",
    "Usage",
]

MAX_STOP_STRINGS = 4

FinishReason = Literal["stop", "length"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    include_usage: bool | None = None


class ImageURL(BaseModel):
    """Where an image part's bytes are: a ``data:image/...;base64,...`` URL, or http(s) where allowed."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """OpenAI's ``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}``."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextPart | ImagePart


@dataclass(frozen=True)
class ImageRef:
    """One image of a request: where it sits in the body (``param``, for errors) and its URL."""

    param: str  # messages[0].content[1].image_url
    url: str
    detail: str | None = None


_PARTS_EXPECTED = (
    'expected a string or a list of {"type": "text", "text": "..."} and '
    '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} parts'
)


class ChatMessage(BaseModel):
    """One message. Text-only list content is joined with newlines (as vLLM does) before templating; a list
    with an image keeps its parts in order, for a vision-language model's template (``template_messages``)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> str | list[ContentPart]:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(_PARTS_EXPECTED)
        if all(_is_text_part(part) for part in value):
            return "\n".join(part["text"] for part in value)
        return [_content_part(index, part) for index, part in enumerate(value)]

    @property
    def text(self) -> str:
        """The message's text, its text parts joined with newlines (images left out)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextPart))

    @property
    def image_urls(self) -> list[tuple[int, ImageURL]]:
        """``(part index, image_url)`` of each image part, in order."""
        if isinstance(self.content, str):
            return []
        return [(i, part.image_url) for i, part in enumerate(self.content) if isinstance(part, ImagePart)]


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _content_part(index: int, part: Any) -> ContentPart:
    """One part, or a ValueError that names it (``content[1]``) and says what a part looks like."""
    if _is_text_part(part):
        return TextPart(type="text", text=part["text"])
    if isinstance(part, dict) and part.get("type") == "image_url":
        image = part.get("image_url")
        if isinstance(image, str):  # the older shape some clients still send: the URL itself
            image = {"url": image}
        if isinstance(image, dict) and isinstance(image.get("url"), str) and image["url"]:
            detail = image.get("detail")
            if detail is None or detail in ("auto", "low", "high"):
                return ImagePart(type="image_url", image_url=ImageURL(url=image["url"], detail=detail))
            raise ValueError(f"content[{index}].image_url.detail must be 'auto', 'low' or 'high', got {detail!r}")
        raise ValueError(
            f'content[{index}].image_url must be {{"url": "data:image/png;base64,..."}} (a non-empty string url)'
        )
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise ValueError(f"content[{index}] is not a text or image_url part (got {kind!r}); {_PARTS_EXPECTED}")


class _SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    stop: list[str] = Field(default_factory=list)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # the end user, for usage (``gateway/auth.py: end_user``); OpenAI's is a string

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("expected a string or a list of strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
        return [s for s in value if s]  # an empty stop string can never mean anything

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def prompt_param(self) -> str:
        return "prompt"

    def prompt_texts(self) -> list[str]:
        """The prompt's texts, each as a tokenizer would be given it (token ids are none)."""
        return []

    def prompt_text_bytes(self) -> int:
        """UTF-8 bytes of the prompt's text (token ids count as none): what a tokenizer would be given."""
        return sum(len(text.encode("utf-8", "surrogatepass")) for text in self.prompt_texts())

    def check_fits(
        self,
        context_tokens: int,
        *,
        prompt_tokens: int | None = None,
        longest_token_bytes: int | None = None,
        counted_at_least: int | None = None,
    ) -> None:
        """ContextOverflow (400) when the prompt and ``max_tokens`` cannot fit in ``context_tokens``.

        As OpenAI and vLLM answer: ``max_tokens`` is not clipped, it is refused with both numbers. Without
        ``prompt_tokens`` (the gateway, before any runner), the prompt counts as at least one token, as
        ``bytes / longest_token_bytes`` tokens when the vocabulary's longest piece is known, or as
        ``counted_at_least`` (``checkpoint.tokens.prompt_tokens_at_least``) when that is more.
        """
        known = prompt_tokens is not None
        size = ""
        if prompt_tokens is None:
            prompt_tokens = 1
            if longest_token_bytes:
                prompt_tokens = max(1, -(-self.prompt_text_bytes() // longest_token_bytes))
                size = f"{self.prompt_text_bytes()} bytes, so at least {prompt_tokens} tokens"
            if counted_at_least is not None and counted_at_least > prompt_tokens:
                prompt_tokens = counted_at_least
                size = f"at least {prompt_tokens} tokens (counted with the model's tokenizer)"
            size = size or f"at least {prompt_tokens} tokens"
        if prompt_tokens >= context_tokens:
            size = f"{prompt_tokens} tokens" if known else size
            raise ContextOverflow(
                f"the prompt is {size} but this model's context is {context_tokens} tokens, "
                f"which leaves no room for a completion; shorten the prompt to at most "
                f"{context_tokens - 1} tokens",
                param=self.prompt_param,
            )
        wanted = self.max_new_tokens
        if wanted is not None and prompt_tokens + wanted > context_tokens:
            prompt = f"{prompt_tokens} in the prompt" if known else f"at least {prompt_tokens} in the prompt"
            raise ContextOverflow(
                f"this model's context is {context_tokens} tokens, but {prompt_tokens + wanted} were asked for "
                f"({prompt}, {wanted} for the completion); lower max_tokens to at most "
                f"{context_tokens - prompt_tokens}, or omit it to use all the room left",
                param=self.max_tokens_param,
            )

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first field that would change the answer but is not implemented."""
        if self.n is not None and self.n > 1:
            return "n", (
                f"n={self.n} is unsupported: this server returns one choice per request; send {self.n} requests instead"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return name, _unsupported(name)
        if self.logit_bias:
            return "logit_bias", _unsupported("logit_bias")
        return None


def _unsupported(name: str) -> str:
    return f"'{name}' is unsupported by this server (it would change the answer); remove it and retry"


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def prompt_param(self) -> str:
        return "messages"

    def prompt_texts(self) -> list[str]:
        return [m.text for m in self.messages]

    def unsupported(self) -> tuple[str, str] | None:
        """Adds the chat-only fields: logprobs, tools and functions, structured output."""
        found = super().unsupported()
        if found is not None:
            return found
        if self.logprobs:
            return "logprobs", _unsupported("logprobs")
        if self.top_logprobs:
            return "top_logprobs", _unsupported("top_logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", (
                'response_format other than {"type": "text"} is unsupported by this server; remove it and retry'
            )
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, _unsupported(name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                return name, _unsupported(name)
        return None

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates expect them; ``developer`` is OpenAI's newer name for ``system``. A message
        with images has list content, each image as ``{"type": "image"}`` in its place (transformers' convention
        for vision-language templates); the images themselves are ``images()``'s, in the same order."""
        messages: list[dict[str, Any]] = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, str):
                messages.append({"role": role, "content": m.content})
                continue
            parts = [
                {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in m.content
            ]
            messages.append({"role": role, "content": parts})
        return messages

    def images(self) -> list[ImageRef]:
        """Every image of the request, in the order a template meets them, each with its ``param`` for errors.

        The one list the gateway's door (caps, decoding, a model that takes no images) and the runner both read.
        """
        return [
            ImageRef(f"messages[{m}].content[{p}].image_url", image.url, image.detail)
            for m, message in enumerate(self.messages)
            for p, image in message.image_urls
        ]


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``; ``prompt`` is one string or one list of token ids after validation."""

    prompt: str | list[int]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
            if len(value) > 1:
                raise ValueError(
                    f"batching several prompts per request is unsupported (got {len(value)}); "
                    "send one request per prompt"
                )
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        raise ValueError("expected a string, a list of one string, or a list of token ids")

    def prompt_texts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else []

    def unsupported(self) -> tuple[str, str] | None:
        """Adds the legacy-completions fields: echo, suffix, logprobs, best_of."""
        found = super().unsupported()
        if found is not None:
            return found
        if self.best_of is not None and self.best_of > 1:
            return "best_of", _unsupported("best_of")
        if self.echo:
            return "echo", _unsupported("echo")
        if self.suffix:
            return "suffix", _unsupported("suffix")
        if self.logprobs is not None:
            return "logprobs", _unsupported("logprobs")
        return None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def to_json(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class ResponseShape:
    """Builds every body of one response, so ``id`` and ``created`` are the same in all its chunks."""

    def __init__(self, *, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage.to_json() if usage else None,
        }

    def response(self, text: str, finish_reason: FinishReason, usage: Usage) -> dict[str, Any]:
        """The whole non-streamed answer."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice], usage)

    def chunk(
        self, *, text: str | None = None, role: bool = False, finish_reason: FinishReason | None = None
    ) -> dict[str, Any]:
        """One streamed choice chunk: the role opener, a text delta, or the closing finish_reason."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self._chunk_object, [choice], None)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The ``include_usage`` chunk: no choices, just the counts."""
        return self._envelope(self._chunk_object, [], usage)

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


# ------------------------------------------------------------------------------------------------ response
# Pydantic models of what the routes answer. The answers themselves are built as dicts (ResponseShape);
# these document them in /openapi.json, and the tests validate real answers against them so the
# document cannot drift from the wire.


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, from the gateway and the runner alike: all four keys present."""

    error: ErrorDetail


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """The answer of ``POST /v1/chat/completions`` without ``stream``. Streamed, the body is SSE:
    ``chat.completion.chunk`` objects (``data: {...}``) and then ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class TextCompletion(BaseModel):
    """The answer of ``POST /v1/completions`` without ``stream``. Streamed, the body is SSE:
    ``text_completion`` objects with text deltas and then ``data: [DONE]``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageBody


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")  # memserve adds its state and source

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion (the usage chunk has no choices)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageBody | None


class TextChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class TextCompletionChunk(BaseModel):
    """One event of a streamed text completion (the usage chunk has no choices)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChunkChoice]
    usage: UsageBody | None
