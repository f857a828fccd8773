"""A real runner process on each tiny fp32 vision demo (LLaVA, and Idefics3, whose processor cuts images into
tiles): greedy answers equal the model's own generate on the processor's inputs (images, several at once, and
text alone), bad images are 400s naming the part while the runner keeps serving, and the worst case with the most
and largest images a request may carry stays within the plan."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.checkpoint.vision import image_token_id
from tests.serving import runner_process
from tests.vision.helpers import data_url, image_message, png, png_header_only

MAX_NEW = 12
RED, GREEN, BLUE = png(50, 40, (200, 10, 30)), png(64, 64, (10, 200, 30)), png(31, 77, (10, 30, 200))
CASES: list[tuple[list[bytes], str]] = [
    ([RED], "what is this?"),
    ([GREEN], "what is this?"),
    ([BLUE, RED], "which is brighter?"),  # two images in one message
    ([], "no picture here"),  # text alone, on the same runner
]


# tokens BLUE (31 × 77) adds to a prompt: LLaVA's 16 a picture; Idefics3 resizes it to 52 × 128, 2 × 4 tiles of 32
# and the whole image, 9 tiles of 4 tokens
BLUE_TOKENS = {"llava": 16, "idefics3": 36}


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    """The demo of one arch; ``runner`` serves it."""
    name = "tiny_vision_dir" if request.param == "llava" else "tiny_idefics3_dir"
    return Path(request.getfixturevalue(name))


@pytest.fixture(scope="module")
def runner(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("vision-runner")
    with runner_process(
        model_dir, folder, name="vis", context=512, concurrency=4, env={"OMP_NUM_THREADS": "1"}
    ) as base:
        yield base


def arch_of(model_dir: Path) -> str:
    return "idefics3" if "Idefics3" in (model_dir / "config.json").read_text() else "llava"


def messages(images: list[bytes], text: str) -> list[dict[str, Any]]:
    if not images:
        return [{"role": "user", "content": text}]
    return [image_message(*(data_url(i) for i in images), text=text)]


def reference(model_dir: Path) -> list[str]:
    """What ``model.generate`` answers greedily on the processor's own inputs, decoded as the runner decodes."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    answers = []
    for images, text in CASES:
        content: Any = [*({"type": "image"} for _ in images), {"type": "text", "text": text}] if images else text
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        pictures = [Image.open(io.BytesIO(i)).convert("RGB") for i in images]
        inputs = processor(images=pictures or None, text=prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        answers.append(str(processor.tokenizer.decode(ids, skip_special_tokens=True)))
    return answers


def test_concurrent_image_requests_equal_generate(runner: str, model_dir: Path) -> None:
    expected = reference(model_dir)
    assert len(set(expected[:2])) == 2, "two images should give two answers, or the test proves nothing"

    async def one(client: httpx.AsyncClient, images: list[bytes], text: str) -> tuple[str, dict[str, int]]:
        body = {
            "model": "vis",
            "messages": messages(images, text),
            "max_tokens": MAX_NEW,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        answer, usage = "", {}
        async with client.stream("POST", f"{runner}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    answer += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
        return answer, usage

    async def all_at_once() -> list[tuple[str, dict[str, int]]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, images, text) for images, text in CASES))

    results = asyncio.run(all_at_once())
    assert [answer for answer, _ in results] == expected
    # the second image is its tokens more in the prompt
    assert results[2][1]["prompt_tokens"] - results[0][1]["prompt_tokens"] >= BLUE_TOKENS[arch_of(model_dir)]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("data:image/png;base64,!!!!", "base64 is corrupt"),
        (data_url(b"just some text, not a picture"), "not an image this server reads"),
        (data_url(png_header_only(20_000, 20_000)), "too large to decode"),
        ("http://127.0.0.1:9/cat.png", "does not fetch http(s) image URLs"),
    ],
)
def test_bad_images_are_400s_naming_the_part_and_the_runner_keeps_serving(runner: str, url: str, words: str) -> None:
    body = {"model": "vis", "max_tokens": 2, "messages": [image_message(data_url(RED), url)]}
    response = httpx.post(f"{runner}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url" and words in error["message"]
    good = {"model": "vis", "max_tokens": 2, "messages": [image_message(data_url(RED))]}
    assert httpx.post(f"{runner}/v1/chat/completions", json=good, timeout=60).status_code == 200


@pytest.mark.parametrize("prompt", ["hello <image> world", "TOKEN_IDS"])
def test_a_completion_holding_the_image_marker_is_a_400_and_the_runner_keeps_serving(
    runner: str, model_dir: Path, prompt: str
) -> None:
    marker = image_token_id(json.loads((model_dir / "config.json").read_text()))
    assert marker is not None
    body = {"model": "vis", "max_tokens": 2, "prompt": [1, marker, 3] if prompt == "TOKEN_IDS" else prompt}
    response = httpx.post(f"{runner}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and f"<image> (id {marker})" in error["message"], error
    assert "chat message" in error["message"]
    body = {"model": "vis", "max_tokens": 2, "prompt": "hello world"}
    assert httpx.post(f"{runner}/v1/completions", json=body, timeout=60).status_code == 200


def test_too_many_images_is_a_400(runner: str) -> None:
    body = {"model": "vis", "max_tokens": 2, "messages": [image_message(*[data_url(RED)] * 5)]}
    response = httpx.post(f"{runner}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and "5 images, more than this server's limit of 4" in response.text


def test_the_worst_case_with_the_largest_images_stays_within_the_plan(runner: str) -> None:
    health = httpx.get(f"{runner}/health").json()
    assert health["engine"] == "image-text" and health["plan"]["engine"] == "image-text"
    check = health["load"]["plan_check"]
    assert check["tries"][0]["images"] == 4, check  # the cap's images, each at the pixel cap, all in one request
    assert check["fits"] and check["sequences"] == 4, check
    reserved, peak = check["reserved_bytes"]["cpu"], health["memory"]["cpu"]["peak_rss_bytes"]
    assert peak <= reserved, f"the runner peaked at {peak} bytes, over its plan's {reserved}"


def noisy_png(seed: int, side: int = 2048) -> bytes:
    """A PNG at the pixel cap that does not shrink (random levels): 5 MiB, the body of 4 of them 25.6 MiB."""
    import numpy as np
    from PIL import Image

    levels = np.random.default_rng(seed).integers(0, 4, (side, side, 3), dtype=np.uint8) * 60
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_a_burst_of_the_largest_bodies_beyond_concurrency_stays_within_the_plan(runner: str) -> None:
    """Twice the runner's concurrency of requests at once, each with 4 images at the pixel cap: the waiting ones
    hold their pixel values but not their bodies (one body is read and prepared at a time), so the peak stays in
    the plan. Before bodies were let go, this burst took a concurrency-4 runner 121 MiB past its plan."""
    urls = [data_url(noisy_png(seed)) for seed in range(4)]
    body = {"model": "vis", "max_tokens": 4, "temperature": 0, "messages": [image_message(*urls)]}
    health = httpx.get(f"{runner}/health").json()
    concurrency = health["load"]["plan_check"]["sequences"]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            calls = (client.post(f"{runner}/v1/chat/completions", json=body) for _ in range(2 * concurrency))
            return list(await asyncio.gather(*calls))

    assert [r.status_code for r in asyncio.run(burst())] == [200] * 2 * concurrency
    health = httpx.get(f"{runner}/health").json()
    reserved = health["load"]["plan_check"]["reserved_bytes"]["cpu"]
    peak = health["memory"]["cpu"]["peak_rss_bytes"]
    assert peak <= reserved, f"the runner peaked at {peak} bytes under the burst, over its plan's {reserved}"


def test_a_queue_longer_than_the_plan_priced_waits_unprepared(tiny_vision_dir: Path, tmp_path: Path) -> None:
    """``max_queue`` beyond the default queue: the plan prices the pixel values of ``image_requests_held``
    requests (one sequence and its default queue of 4 here), so the runner prepares no more than those at once;
    the rest wait unread, and every request is still answered."""
    from memserve.memory.planner import image_requests_held

    held = image_requests_held(1)
    with runner_process(tiny_vision_dir, tmp_path, name="vis", context=512, concurrency=1, max_queue=3 * held) as base:
        body = {"model": "vis", "max_tokens": 24, "temperature": 0, "messages": messages([RED], "what is this?")}
        seen: list[int] = []

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=300) as client:
                url = f"{base}/v1/chat/completions"
                calls = asyncio.gather(*(client.post(url, json=body) for _ in range(3 * held)))
                while not calls.done():
                    stats = (await client.get(f"{base}/stats")).json()
                    seen.append(stats["running"] + stats["waiting"])
                    await asyncio.sleep(0.01)
                return list(await calls)

        answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 3 * held
    assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1  # greedy: one answer
    assert max(seen) <= held, f"the runner held {max(seen)} prepared requests, more than the {held} its plan priced"
    assert max(seen) >= 2, f"the burst never queued behind the running sequence ({seen}): the check saw nothing"


def test_a_slow_body_is_a_408_and_holds_the_others_up_no_longer(tiny_vision_dir: Path, tmp_path: Path) -> None:
    """The runner reads one body at a time (the plan prices one); a client that sends half a body and stalls gets a
    408 once ``MEMSERVE_IMAGE_BODY_SECONDS`` pass, and a whole request sent after it is answered. Before the
    deadline, the stalled client held every other request for as long as it kept its connection open."""
    import socket
    import time
    from urllib.parse import urlsplit

    from memserve.runner.vision import BODY_SECONDS_ENV

    env = {BODY_SECONDS_ENV: "1", "OMP_NUM_THREADS": "1"}
    with runner_process(tiny_vision_dir, tmp_path, name="vis", context=512, concurrency=1, env=env) as base:
        url = urlsplit(base)
        body = json.dumps({"model": "vis", "max_tokens": 2, "messages": messages([RED], "what is this?")}).encode()
        with socket.create_connection((url.hostname, url.port), timeout=120) as slow:
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            slow.sendall(head.encode() + body[: len(body) // 2])  # and nothing more
            time.sleep(0.5)  # let it take the lock first (were the order to flip, the 200 below would prove less)
            whole = {"model": "vis", "max_tokens": 2, "messages": messages([GREEN], "what is this?")}
            answer = httpx.post(f"{base}/v1/chat/completions", json=whole, timeout=120)
            assert answer.status_code == 200, answer.text
            reply = slow.recv(65536).decode()
        assert reply.startswith("HTTP/1.1 408"), reply
        error = json.loads(reply.split("\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_body_timeout" and "did not arrive within 1 s" in error["message"]
