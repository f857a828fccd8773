"""Image parts in the chat schema: accepted in order, listed with the param that names them, refused clearly."""

from __future__ import annotations

from typing import Any

import pytest

from memserve.errors import InvalidArgument
from memserve.wire.http import parse_body
from memserve.wire.schema import ChatCompletionRequest, ImageRef

URL = "data:image/png;base64,AAAA"


def request(*messages: dict[str, Any]) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, {"model": "m", "messages": list(messages)})


def test_image_parts_are_kept_in_order_and_listed_with_their_param() -> None:
    body = request(
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "compare"},
                {"type": "image_url", "image_url": {"url": URL, "detail": "low"}},
                {"type": "image_url", "image_url": "data:image/jpeg;base64,BBBB"},  # the older shape
            ],
        },
    )
    assert body.images() == [
        ImageRef("messages[1].content[1].image_url", URL, "low"),
        ImageRef("messages[1].content[2].image_url", "data:image/jpeg;base64,BBBB", None),
    ]
    assert body.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "compare"}, {"type": "image"}, {"type": "image"}]},
    ]
    assert body.prompt_text_bytes() == len("be brief") + len("compare")


def test_text_parts_alone_are_joined_as_before() -> None:
    body = request({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})
    assert body.messages[0].content == "a\nb" and body.images() == []
    assert body.template_messages() == [{"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ([{"type": "image_url"}], "content[0].image_url must be"),
        ([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": ""}}], "content[1].image_url"),
        ([{"type": "image_url", "image_url": {"url": URL, "detail": "max"}}], "content[0].image_url.detail"),
        ([{"type": "input_audio", "input_audio": {}}], "content[0] is not a text or image_url part"),
        (5, "expected a string or a list"),
    ],
)
def test_bad_parts_are_a_400_naming_the_part(content: Any, words: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        request({"role": "user", "content": content})
    assert raised.value.param == "messages[0].content"
    assert words in raised.value.message
