"""The encoder wire shapes: OpenAI's ``/v1/embeddings`` and vLLM's ``/v1/classify``, requests and answers.

Torch-free: the gateway validates a body with these models and :func:`check_encoder_request` before it
leases or loads anything, and the encoder runner (``runner/encoder.py``) validates with the same ones.

``POST /v1/embeddings`` is OpenAI's: ``input`` a string, a list of strings, a list of token ids or a list of
token-id lists; ``encoding_format`` ``float`` (default) or ``base64`` (little-endian float32, as OpenAI
sends); ``dimensions`` where the model allows it (``checkpoint/encoders.py`` has the rule); ``user`` is
accepted and ignored. The answer is ``{"object": "list", "data": [{"object": "embedding", "index",
"embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``.

``POST /v1/classify`` is vLLM's: ``{"model", "input": str | [str]}`` answered with ``{"id": "classify-…",
"object": "list", "created", "model", "data": [{"index", "label", "probs", "num_classes"}], "usage":
{"prompt_tokens", "total_tokens", "completion_tokens": 0}}``.

Limits, each a 400 that says what to do:

- at most ``MAX_INPUTS`` (2,048, OpenAI's own cap for embeddings) inputs in one request;
- no empty input (an empty string or an empty token list): it has no meaning to embed;
- an input longer than the model's limit (``EncoderFacts.max_tokens``, special tokens included) is refused
  with the limit, unless the request asks to truncate: ``"truncate": true`` keeps the first ``max_tokens``
  tokens, and vLLM's ``truncate_prompt_tokens: k`` keeps the first ``k`` (``-1``: the model's limit). The
  gateway refuses what its bytes alone prove too long; the runner counts tokens.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from memserve.errors import ContextOverflow, InvalidArgument, UnsupportedParameter
from memserve.wire.routes import CLASSIFY, EMBEDDINGS, ENCODER_ROUTES, Route

if TYPE_CHECKING:
    from memserve.checkpoint.encoders import EncoderFacts, Task

__all__ = [
    "CLASSIFY",
    "EMBEDDINGS",
    "ENCODER_ROUTES",
    "MAX_INPUTS",
    "ClassifyRequest",
    "EmbeddingRequest",
    "EncoderRequest",
    "check_encoder_request",
    "classify_response",
    "embedding_response",
    "encoder_route",
    "input_too_long",
]


MAX_INPUTS = 2048
"""Inputs in one request: OpenAI's cap for embeddings, and ours for classification too. Larger lists are
split by the client; one request's inputs are batched with everyone else's by token budget anyway."""

Input = str | list[int]


def _inputs(value: Any, *, tokens: bool) -> list[Input]:
    """One list of inputs from every shape OpenAI accepts (or, without ``tokens``, vLLM's classify accepts)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if tokens and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if tokens and all(
            isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value
        ):
            return [list(v) for v in value]
    if isinstance(value, list) and not value:
        raise ValueError("the input list is empty; send at least one input")
    shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
    raise ValueError(f"expected {shapes if tokens else 'a string or a list of strings'}")


class _EncoderRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    input: list[Input]
    truncate: bool = False
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # vLLM's name; -1: the model's limit
    user: str | None = None

    def max_tokens(self, limit: int) -> int | None:
        """Tokens an input is cut to, or None when too long an input is refused (the module docstring)."""
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens != 0:
            return limit if self.truncate_prompt_tokens == -1 else min(limit, self.truncate_prompt_tokens)
        return limit if self.truncate else None


class EmbeddingRequest(_EncoderRequest):
    """OpenAI's embeddings request."""

    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _any_input(cls, value: Any) -> list[Input]:
        return _inputs(value, tokens=True)


class ClassifyRequest(_EncoderRequest):
    """vLLM's classification request."""

    @field_validator("input", mode="before")
    @classmethod
    def _text_input(cls, value: Any) -> list[Input]:
        return _inputs(value, tokens=False)


EncoderRequest = EmbeddingRequest | ClassifyRequest

_ROUTE_OF: dict[str, Route] = {"embed": EMBEDDINGS, "classify": CLASSIFY}


def encoder_route(task: Task) -> Route:
    """The one route a model of ``task`` answers."""
    return _ROUTE_OF[task]


def check_encoder_request(
    body: EncoderRequest, facts: EncoderFacts, *, model: str, max_text_bytes: int | None = None
) -> None:
    """Refuse, before any load or tokenizing, what the model cannot answer (the module docstring's limits).

    ``max_text_bytes``: past this many UTF-8 bytes a text is sure to be over ``facts.max_tokens`` tokens
    (``checkpoint/tokens.py: max_prompt_bytes``); None when the vocabulary is not known yet.
    """
    wanted: Task = "embed" if isinstance(body, EmbeddingRequest) else "classify"
    if facts.task != wanted:
        other = encoder_route(facts.task)
        raise InvalidArgument(
            f"the model '{model}' is {'an embedding model' if facts.task == 'embed' else 'a classifier'}: "
            f"send its requests to {other}, not {encoder_route(wanted)}",
            param="model",
        )
    if len(body.input) > MAX_INPUTS:
        raise InvalidArgument(
            f"the request has {len(body.input)} inputs, more than the {MAX_INPUTS} one request may hold; "
            f"split it into requests of at most {MAX_INPUTS}",
            param="input",
        )
    cut = body.max_tokens(facts.max_tokens)
    for index, item in enumerate(body.input):
        param = f"input[{index}]" if len(body.input) > 1 else "input"
        if not item:
            raise InvalidArgument(f"{param} is empty; every input needs at least one character or token", param=param)
        if isinstance(item, list):
            if any(t < 0 for t in item):
                raise InvalidArgument(f"{param} has a negative token id; token ids start at 0", param=param)
            if cut is None and len(item) > facts.max_tokens:
                raise input_too_long(param, f"{len(item)} tokens", facts.max_tokens)
        elif cut is None and max_text_bytes is not None:
            size = len(item.encode("utf-8", "surrogatepass"))
            if size > max_text_bytes:
                raise input_too_long(param, f"{size} bytes, so more than {facts.max_tokens} tokens", facts.max_tokens)
    dimensions = body.dimensions if isinstance(body, EmbeddingRequest) else None
    if dimensions is not None and not facts.allowed_dimensions(dimensions):
        if facts.matryoshka_dimensions is None:
            allowed = f"only its full size, {facts.dimensions}"
        elif not facts.matryoshka_dimensions:
            allowed = f"1 to {facts.dimensions}"
        else:
            allowed = ", ".join(str(d) for d in facts.matryoshka_dimensions)
        raise UnsupportedParameter(
            f"dimensions={dimensions} is not one this model was trained for; it allows {allowed} "
            "(omit dimensions for the full size)",
            param="dimensions",
        )


def input_too_long(param: str, size: str, limit: int) -> ContextOverflow:
    """The 400 for an input over the model's limit (the runner raises it too, once it has counted tokens)."""
    return ContextOverflow(
        f"{param} is {size}, more than this model's limit of {limit} tokens per input; shorten it, or send "
        '"truncate": true to embed only its first tokens',
        param=param,
    )


def _usage(prompt_tokens: int, *, completion: bool) -> dict[str, int]:
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {**usage, "completion_tokens": 0} if completion else usage


def embedding_response(
    model: str, vectors: Sequence[Any], *, encoding_format: str, prompt_tokens: int
) -> dict[str, Any]:
    """OpenAI's embeddings answer. ``vectors`` are 1-d float arrays (numpy), one per input, in input order."""
    import numpy as np

    data: list[dict[str, Any]] = []
    for index, vector in enumerate(vectors):
        array = np.asarray(vector, dtype="<f4")
        embedding: Any = base64.b64encode(array.tobytes()).decode("ascii") if encoding_format == "base64" else None
        if embedding is None:
            embedding = array.tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": model, "usage": _usage(prompt_tokens, completion=False)}


def classify_response(
    model: str, probs: Sequence[Sequence[float]], labels: Sequence[str], *, prompt_tokens: int
) -> dict[str, Any]:
    """vLLM's classify answer: per input the most likely label, every class's probability and their count."""
    data = []
    for index, row in enumerate(probs):
        values = [float(p) for p in row]
        best = max(range(len(values)), key=values.__getitem__)
        data.append({"index": index, "label": labels[best], "probs": values, "num_classes": len(values)})
    return {
        "id": f"classify-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": _usage(prompt_tokens, completion=True),
    }
