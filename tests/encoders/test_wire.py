"""The embeddings and classify request shapes, and the checks the gateway runs before any load."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from memserve.checkpoint.encoders import EncoderFacts, Pooling
from memserve.errors import ContextOverflow, InvalidArgument, UnsupportedParameter
from memserve.wire.encoders import (
    MAX_INPUTS,
    ClassifyRequest,
    EmbeddingRequest,
    check_encoder_request,
    classify_response,
    embedding_response,
)

EMBED = EncoderFacts("embed", 128, 64, Pooling("mean", True, True), (32, 16), (), False)
CLASSIFY = EncoderFacts("classify", 128, 64, None, None, ("spam", "ham"), False)


@pytest.mark.parametrize(
    ("given", "inputs"),
    [
        ("one text", ["one text"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_embedding_inputs_as_openai_takes_them(given: Any, inputs: list[Any]) -> None:
    assert EmbeddingRequest.model_validate({"model": "m", "input": given}).input == inputs


@pytest.mark.parametrize("given", [[], ["a", 1], [[1], "a"], [True], 5, None, [[1.5]]])
def test_embedding_inputs_of_other_shapes_are_refused(given: Any) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": given})


def test_classify_takes_text_only() -> None:
    assert ClassifyRequest.model_validate({"model": "m", "input": "x"}).input == ["x"]
    with pytest.raises(ValidationError):
        ClassifyRequest.model_validate({"model": "m", "input": [1, 2]})


def _check(body: dict[str, Any], facts: EncoderFacts = EMBED, max_text_bytes: int | None = 1000) -> None:
    request = (EmbeddingRequest if facts.task == "embed" else ClassifyRequest).model_validate({"model": "m", **body})
    check_encoder_request(request, facts, model="m", max_text_bytes=max_text_bytes)


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        ({"input": ""}, InvalidArgument, "input is empty"),
        ({"input": ["a", ""]}, InvalidArgument, r"input\[1\] is empty"),
        ({"input": [[]]}, InvalidArgument, "input is empty"),
        ({"input": ["x"] * 10_000}, InvalidArgument, f"10000 inputs, more than the {MAX_INPUTS}"),
        ({"input": "x" * 1001}, ContextOverflow, "limit of 128 tokens per input"),
        ({"input": [list(range(129))]}, ContextOverflow, "129 tokens, more than this model's limit of 128"),
        ({"input": [-1]}, InvalidArgument, "negative token id"),
        ({"input": "x", "dimensions": 20}, UnsupportedParameter, "allows 32, 16"),
    ],
)
def test_bad_requests_are_400s_that_say_what_to_do(body: dict[str, Any], error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words) as caught:
        _check(body)
    assert getattr(caught.value, "status_code", None) == 400


def test_truncation_is_asked_for_not_assumed() -> None:
    _check({"input": "x" * 5000, "truncate": True})
    _check({"input": [list(range(500))], "truncate_prompt_tokens": -1})
    _check({"input": "x", "dimensions": 16})
    _check({"input": "x", "dimensions": 64})


def test_the_wrong_route_names_the_right_one() -> None:
    with pytest.raises(InvalidArgument, match="POST /v1/classify"):
        check_encoder_request(EmbeddingRequest(model="m", input=["x"]), CLASSIFY, model="m")
    with pytest.raises(InvalidArgument, match="POST /v1/embeddings"):
        check_encoder_request(ClassifyRequest(model="m", input=["x"]), EMBED, model="m")


def test_base64_is_little_endian_float32_as_openai_sends() -> None:
    vector = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    answer = embedding_response("m", [vector], encoding_format="base64", prompt_tokens=3)
    decoded = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == [0.5, -1.25, 3.0]
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_classify_answer_is_vllms_shape() -> None:
    answer = classify_response("m", [[0.25, 0.75]], ("spam", "ham"), prompt_tokens=4)
    assert answer["object"] == "list" and answer["id"].startswith("classify-")
    assert answer["data"] == [{"index": 0, "label": "ham", "probs": [0.25, 0.75], "num_classes": 2}]
    assert answer["usage"] == {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0}


def test_what_the_gateway_calls_imports_neither_torch_nor_the_runner() -> None:
    import subprocess
    import sys

    code = (
        "import sys, memserve.wire.encoders, memserve.checkpoint.encoders, memserve.memory.encoders; "
        "bad = [m for m in sys.modules if m in ('torch', 'transformers') or m.startswith('memserve.runner')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
