"""Images in chat requests: caps, ``data:`` URLs decoded and checked, http(s) URLs fetched only when allowed.

Torch-free (Pillow and httpx only), so the gateway's door checks every image before it leases, loads or evicts
anything, and the runner checks the same way before its processor sees the bytes. Each refusal is a 400 whose
``param`` names the part (``messages[0].content[1].image_url``) and whose message says what to send instead.

Why each check is where it is:

- The byte cap is applied to the base64 text before it is decoded, and while an http(s) body streams in, so
  a huge image never sits in memory whole.
- Pillow reads only the header to learn an image's size (``Image.open`` is lazy); the pixel cap refuses a
  20,000 × 20,000 PNG (a few hundred KB compressed, 1.2 GB decoded) before a single row is decoded. Pillow's
  own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) fires first for the largest ones; its warning and
  its error both become the same 400.
- Only common still-image formats are opened (``FORMATS``): every decoder Pillow carries is attack surface.
- http(s) URLs are refused unless the server says ``image_urls: allow``: a server that fetches what a client
  names becomes a way into the network it sits in.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memserve.errors import InvalidArgument
from memserve.wire.schema import ImageRef

if TYPE_CHECKING:
    import httpx
    from PIL import Image

__all__ = [
    "FORMATS",
    "DecodedImage",
    "ImageLimits",
    "check_images",
    "decode_data_url",
    "fetch_image",
    "load_images",
    "open_rgb",
]

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
"""What Pillow may open here: the formats OpenAI's vision API takes, and BMP."""

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.A)
INVALID_IMAGE = "invalid_image"


@dataclass(frozen=True)
class ImageLimits:
    """The server's caps on a request's images; ``allow_urls`` is the ``image_urls: allow`` setting."""

    max_images: int = 4  # vLLM takes one per prompt unless told more; a plan prices this many per request
    max_bytes: int = 10 * 1024 * 1024  # per image, encoded (as sent, after base64)
    # per image, width × height: OpenAI scales every image to fit 2048 × 2048 before its model reads it, and a
    # runner holds ~7 bytes a pixel per image while its processor resizes them (memory/vision.py)
    max_pixels: int = 2048 * 2048
    allow_urls: bool = False
    fetch_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class DecodedImage:
    """One image's bytes, checked: an image Pillow can open, within the caps. ``param`` names its part."""

    param: str
    data: bytes
    format: str  # Pillow's name: PNG, JPEG, ...
    width: int
    height: int


def _refuse(ref: ImageRef, message: str) -> InvalidArgument:
    return InvalidArgument(f"{ref.param}: {message}", param=ref.param, code=INVALID_IMAGE)


def check_images(refs: Sequence[ImageRef], limits: ImageLimits) -> None:
    """The count cap and the URL policy, which need no bytes: the door's first look."""
    if len(refs) > limits.max_images:
        raise InvalidArgument(
            f"this request has {len(refs)} images, more than this server's limit of {limits.max_images} per "
            "request (the model's images.max_images); send fewer images, or split the request",
            param=refs[limits.max_images].param,
            code=INVALID_IMAGE,
        )
    for ref in refs:
        scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url else ""
        if scheme == "data":
            continue
        if scheme in ("http", "https"):
            if not limits.allow_urls:
                raise _refuse(
                    ref,
                    "this server does not fetch http(s) image URLs (its image_urls setting is off); send the image "
                    "inline as a data:image/png;base64,... URL",
                )
            continue
        raise _refuse(ref, f"expected a data:image/...;base64,... URL (or http(s) where allowed), got {ref.url[:40]!r}")


def decode_data_url(ref: ImageRef, limits: ImageLimits) -> DecodedImage:
    """The image in a ``data:image/...;base64,`` URL, checked; InvalidArgument (400) naming the part if not."""
    match = _DATA_URL.match(ref.url)
    if match is None or not match["b64"]:
        raise _refuse(ref, "expected a base64 data URL: data:image/png;base64,...")
    mime = (match["mime"] or "").lower()
    if not mime.startswith("image/"):
        raise _refuse(ref, f"the data URL's type is {mime or 'missing'!r}, not an image type (image/png, image/jpeg)")
    text = ref.url[match.end() :]
    if len(text) // 4 * 3 > limits.max_bytes:  # before decoding: a huge body is never decoded
        raise _refuse(ref, _too_many_bytes(len(text) // 4 * 3, limits))
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _refuse(ref, f"the data URL's base64 is corrupt ({exc}); encode the file's bytes with base64") from None
    return _checked(ref, data, limits)


def _too_many_bytes(size: int, limits: ImageLimits) -> str:
    return (
        f"the image is {size} bytes, more than this server's limit of {limits.max_bytes} bytes per image "
        "(images.max_image_bytes); send a smaller image"
    )


def _checked(ref: ImageRef, data: bytes, limits: ImageLimits) -> DecodedImage:
    """Read the header only: format and size, against the caps."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise _refuse(ref, _too_many_bytes(len(data), limits))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height, kind = image.width, image.height, str(image.format)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's words are for a developer
        raise _refuse(
            ref,
            f"the image is too large to decode (its header says more than {Image.MAX_IMAGE_PIXELS} pixels); this "
            f"server's limit is {limits.max_pixels} pixels (images.max_image_pixels): scale it down",
        ) from None
    except UnidentifiedImageError:  # its text names the BytesIO object it was given
        raise _refuse(ref, f"the bytes are not an image this server reads ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _refuse(
            ref, f"the bytes are not an image this server reads ({', '.join(FORMATS)}): {type(exc).__name__}: {exc}"
        ) from None
    if width * height > limits.max_pixels:
        raise _refuse(
            ref,
            f"the image is {width} × {height} = {width * height} pixels, more than this server's limit of "
            f"{limits.max_pixels} pixels (images.max_image_pixels); scale it down (the model resizes it to far "
            "fewer anyway)",
        )
    return DecodedImage(ref.param, data, kind, width, height)


async def fetch_image(ref: ImageRef, limits: ImageLimits, client: httpx.AsyncClient) -> DecodedImage:
    """An http(s) image, fetched with the caps (a timeout, the byte limit while it streams), then checked."""
    import httpx

    if not limits.allow_urls:
        check_images([ref], limits)  # raises: the policy's message
    chunks: list[bytes] = []
    size = 0
    seconds = limits.fetch_timeout_seconds
    try:  # httpx's timeout is per read: a host sending a byte a second would hold the request for ever; this is whole
        async with asyncio.timeout(seconds), client.stream("GET", ref.url, timeout=seconds) as response:
            if response.status_code != 200:
                raise _refuse(ref, f"fetching the image URL answered HTTP {response.status_code}; check the URL")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                raise _refuse(ref, _too_many_bytes(int(declared), limits))
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limits.max_bytes:
                    raise _refuse(ref, _too_many_bytes(size, limits))
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise _refuse(ref, f"the image URL could not be fetched ({type(exc).__name__}: {exc}); check the URL") from None
    except TimeoutError:
        raise _refuse(
            ref, f"fetching the image URL took more than {seconds:g} s ({size} bytes came); check the URL"
        ) from None
    return _checked(ref, b"".join(chunks), limits)


async def load_images(
    refs: Sequence[ImageRef], limits: ImageLimits, client: httpx.AsyncClient | None = None
) -> list[DecodedImage]:
    """Every image of a request, checked, in order: data URLs decoded, http(s) ones fetched when allowed.

    Without ``client`` an http(s) URL is fetched with a client of its own (which follows up to 3 redirects)."""
    import httpx

    check_images(refs, limits)
    images: list[DecodedImage] = []
    own: httpx.AsyncClient | None = None
    try:
        for ref in refs:
            if ref.url[:5].lower() == "data:":
                images.append(decode_data_url(ref, limits))
                continue
            if client is None:
                client = own = httpx.AsyncClient(follow_redirects=True, max_redirects=3)
            images.append(await fetch_image(ref, limits, client))
    finally:
        if own is not None:
            await own.aclose()
    return images


def open_rgb(image: DecodedImage) -> Image.Image:
    """Decode every pixel (the runner's step, for the processor), as RGB; a body corrupt past its header is a 400."""
    from PIL import Image

    ref = ImageRef(image.param, "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image.data), formats=FORMATS) as opened:
                return opened.convert("RGB")  # convert loads every pixel: a truncated body fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _refuse(
            ref, f"the image could not be decoded ({type(exc).__name__}: {exc}); send a whole image file"
        ) from None
