"""wire/images.py: every bad image is a 400 naming its part, checked before it is decoded; URLs only when allowed."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import httpx
import pytest

from memserve.errors import InvalidArgument
from memserve.wire.images import ImageLimits, check_images, decode_data_url, load_images, open_rgb
from memserve.wire.schema import ImageRef
from tests.vision.helpers import data_url, png, png_header_only

PARAM = "messages[0].content[1].image_url"


def ref(url: str) -> ImageRef:
    return ImageRef(PARAM, url)


def test_a_png_data_url_decodes_with_its_size() -> None:
    image = decode_data_url(ref(data_url(png(50, 40))), ImageLimits())
    assert (image.format, image.width, image.height, image.param) == ("PNG", 50, 40, PARAM)
    assert open_rgb(image).size == (50, 40)


@pytest.mark.parametrize(
    ("url", "limits", "words"),
    [
        ("data:image/png;base64,not*base64!", ImageLimits(), "base64 is corrupt"),
        (data_url(b"%PDF-1.7 not an image at all"), ImageLimits(), "not an image this server reads"),
        (data_url(png(), mime="text/plain"), ImageLimits(), "not an image type"),
        ("data:image/png,rawbytes", ImageLimits(), "expected a base64 data URL"),
        (data_url(png_header_only(20_000, 20_000)), ImageLimits(), "too large to decode"),
        (data_url(png_header_only(3000, 3000)), ImageLimits(), "3000 × 3000 = 9000000 pixels"),
        (data_url(png(64, 64)), ImageLimits(max_pixels=32 * 32), "64 × 64 = 4096 pixels"),
        (data_url(png()), ImageLimits(max_bytes=64), "more than this server's limit of 64 bytes"),
    ],
)
def test_bad_images_are_a_400_naming_the_part(url: str, limits: ImageLimits, words: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        decode_data_url(ref(url), limits)
    assert raised.value.param == PARAM and raised.value.code == "invalid_image"
    assert words in raised.value.message and raised.value.message.startswith(PARAM)
    assert " object at 0x" not in raised.value.message and "DOS attack" not in raised.value.message  # Pillow's text


def test_a_body_corrupt_past_its_header_fails_when_decoded() -> None:
    whole = png(64, 64, (1, 2, 3))
    image = decode_data_url(ref(data_url(whole[: len(whole) - 30])), ImageLimits())  # the header reads fine
    with pytest.raises(InvalidArgument, match="could not be decoded") as raised:
        open_rgb(image)
    assert raised.value.param == PARAM


def test_counts_and_urls_are_refused_before_any_bytes() -> None:
    many = [ImageRef(f"messages[0].content[{i}].image_url", data_url(png())) for i in range(3)]
    with pytest.raises(InvalidArgument, match="3 images, more than this server's limit of 2") as raised:
        check_images(many, ImageLimits(max_images=2))
    assert raised.value.param == "messages[0].content[2].image_url"
    with pytest.raises(InvalidArgument, match="does not fetch http") as raised:
        check_images([ref("http://169.254.169.254/latest/meta-data")], ImageLimits())
    assert raised.value.param == PARAM
    with pytest.raises(InvalidArgument, match="expected a data:image"):
        check_images([ref("file:///etc/passwd")], ImageLimits(allow_urls=True))


def serve(handler: httpx.MockTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=handler)


def test_allowed_urls_are_fetched_with_the_same_caps() -> None:
    picture = png(20, 10)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/big":
            return httpx.Response(200, content=b"x" * 5000)  # no Content-Length promise kept to: streamed
        if request.url.path == "/gone":
            return httpx.Response(404)
        return httpx.Response(200, content=picture)

    async def fetch(path: str, limits: ImageLimits) -> object:
        async with serve(httpx.MockTransport(answer)) as client:
            return await load_images([ref(f"http://images.test{path}")], limits, client)

    allowed = ImageLimits(allow_urls=True, max_bytes=4096)
    (image,) = asyncio.run(fetch("/cat.png", allowed))  # type: ignore[misc]
    assert (image.width, image.height) == (20, 10) and image.data == picture
    with pytest.raises(InvalidArgument, match="limit of 4096 bytes"):
        asyncio.run(fetch("/big", allowed))
    with pytest.raises(InvalidArgument, match="HTTP 404"):
        asyncio.run(fetch("/gone", allowed))
    with pytest.raises(InvalidArgument, match="does not fetch"):
        asyncio.run(fetch("/cat.png", ImageLimits()))


def test_a_fetch_is_timed_whole_not_per_read() -> None:
    """A host that sends a byte every 0.1 s never trips httpx's per-read timeout; the fetch's own limit is whole."""

    async def drip() -> AsyncIterator[bytes]:
        for _ in range(60):
            yield b"x"
            await asyncio.sleep(0.1)

    async def fetch() -> object:
        async with serve(httpx.MockTransport(lambda request: httpx.Response(200, content=drip()))) as client:
            return await load_images([ref("http://images.test/slow.png")], limits, client)

    limits = ImageLimits(allow_urls=True, fetch_timeout_seconds=0.5)
    with pytest.raises(InvalidArgument, match=r"took more than 0.5 s \(\d+ bytes came\)"):
        asyncio.run(fetch())  # before: all 6 s of it read, then "not an image"


def test_the_base64_cap_is_applied_before_decoding() -> None:
    text = base64.b64encode(b"\0" * 10_000).decode()
    with pytest.raises(InvalidArgument, match="limit of 1000 bytes"):
        decode_data_url(ref(f"data:image/png;base64,{text}"), ImageLimits(max_bytes=1000))
