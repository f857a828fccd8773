"""Images through the gateway: relayed unchanged to a provider, refused for a text-only model before any load,
served by a vision-language runner, http(s) image URLs fetched by the gateway only with ``image_urls: allow``, and a
model's own caps on images refused at the door and planned for its runner."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from memserve.checkpoint.demo_adapter import write_demo_adapter
from memserve.config import ImageCapsConfig, ProviderConfig
from tests.gateway.test_gateway_process import GiB, gateway, host, local, ps, settings_for
from tests.serving import FakeOpenAI, serve_app, serve_fake
from tests.vision.helpers import data_url, image_message, png

RED = png(50, 40, (200, 10, 30))


def ask(origin: str, model: str, *messages: dict[str, Any]) -> httpx.Response:
    body = {"model": model, "messages": list(messages), "max_tokens": 6, "temperature": 0}
    return httpx.post(f"{origin}/v1/chat/completions", json=body, timeout=120)


def picture_server() -> Starlette:
    async def picture(request: Request) -> Response:
        return Response(RED, media_type="image/png")

    return Starlette(routes=[Route("/red.png", picture)])


def test_images_through_the_gateway(tmp_path: Path, tiny_model_dir: Path, tiny_vision_dir: Path) -> None:
    message = image_message(data_url(RED), text="what is this?")
    # a vision-language checkpoint whose tower has no fixed image size (Qwen2-VL): served as text; the door refuses
    # its images before any load, so its config is all it needs here
    qwen2_vl = tmp_path / "qwen2-vl"
    qwen2_vl.mkdir()
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"}
    (qwen2_vl / "config.json").write_text(json.dumps(config | {"vision_config": {"depth": 2, "embed_dim": 32}}))
    with serve_fake(FakeOpenAI(models=("m1",))) as fake, serve_app(picture_server()) as pictures:
        settings = settings_for(
            tmp_path,
            [
                local("tiny", tiny_model_dir),
                local("vis", tiny_vision_dir),
                local("qvl", qwen2_vl),
                local("qvl-vllm", qwen2_vl, runner="vllm"),  # vLLM reads its own towers: the door lets images by
                local("tiny-vllm", tiny_model_dir, runner="vllm"),  # a text-only model is one on vLLM too
            ],
            providers=[ProviderConfig(name="fake", base_url=fake.base_url, api_key_env="FAKE_KEY", models=["m1"])],
        )
        os.environ["FAKE_KEY"] = "sekrit"
        with gateway(settings, host(4 * GiB)) as (origin, _):
            relayed = ask(origin, "fake/m1", message)
            assert relayed.status_code == 200, relayed.text
            sent = fake.requests[-1].body
            assert sent is not None and sent["messages"] == [message]  # the image part as the client sent it

            refused = ask(origin, "tiny", message)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert "the model 'tiny' takes no images" in error["message"]
            assert error["param"] == "messages[0].content[0].image_url"
            unread = ask(origin, "qvl", message)
            assert unread.status_code == 400, unread.text
            words = "the model 'qvl' is a vision-language model (qwen2_vl), but memserve does not read images"
            assert words in unread.json()["error"]["message"] and "runner: vllm" in unread.json()["error"]["message"]
            text_on_vllm = ask(origin, "tiny-vllm", message)
            assert text_on_vllm.status_code == 400 and "text-only model" in text_on_vllm.text, text_on_vllm.text
            bad = ask(origin, "vis", image_message("data:image/png;base64,!!!!"))
            assert bad.status_code == 400 and "base64 is corrupt" in bad.text
            url = ask(origin, "vis", image_message(f"{pictures}/red.png"))
            assert url.status_code == 400 and "does not fetch http(s) image URLs" in url.text
            assert not ps(origin)["models"], "bad input loaded a model"
            on_vllm = ask(origin, "qvl-vllm", message)  # no vLLM here: it fails later, but not at the image door
            assert on_vllm.status_code != 200 and on_vllm.json()["error"]["code"] != "model_takes_no_images"

            served = ask(origin, "vis", message)
            assert served.status_code == 200, served.text
            answer = served.json()["choices"][0]["message"]["content"]
            assert served.json()["usage"]["prompt_tokens"] > 16  # the image's 16 tokens and the text

            # an adapter added to the loaded vision model at run time: served by the same runner, under its name
            adapter = write_demo_adapter(tiny_vision_dir, tmp_path / "vad", seed=1).path
            body = {"model": "vis", "name": "vad", "source": str(adapter)}
            added = httpx.post(f"{origin}/api/adapters", json=body, timeout=120)
            assert added.status_code == 200, added.text
            models = {m["id"]: m.get("parent") for m in httpx.get(f"{origin}/v1/models").json()["data"]}
            assert models["vad"] == "vis"
            adapted = ask(origin, "vad", message)
            assert adapted.status_code == 200, adapted.text
            assert adapted.json()["choices"][0]["message"]["content"] != answer  # the adapter changes it
            assert len(ps(origin)["models"]) == 1  # one runner: the base is loaded once

        # a model's own caps: the door refuses past them, and the runner is planned and warmed up for them
        caps = ImageCapsConfig(max_images=1, max_image_pixels=64 * 64)
        allowed = settings_for(tmp_path, [local("vis", tiny_vision_dir, images=caps)], image_urls="allow")
        with gateway(allowed, host(4 * GiB)) as (origin, _):
            two = ask(origin, "vis", image_message(data_url(RED), data_url(RED)))
            assert two.status_code == 400 and "limit of 1 per request (the model's images.max_images)" in two.text
            wide = ask(origin, "vis", image_message(data_url(png(100, 50))))
            assert wide.status_code == 400 and "limit of 4096 pixels" in wide.text, wide.text
            assert not ps(origin)["models"], "bad input loaded a model"
            fetched = ask(origin, "vis", image_message(f"{pictures}/red.png", text="what is this?"))
            assert fetched.status_code == 200, fetched.text
            assert fetched.json()["choices"][0]["message"]["content"] == answer  # the same image, fetched
            missing = ask(origin, "vis", image_message(f"{pictures}/nothing.png"))
            assert missing.status_code == 400 and "HTTP 404" in missing.text
            with httpx.Client(transport=httpx.HTTPTransport(uds=ps(origin)["models"][0]["socket"])) as runner:
                health = runner.get("http://runner/health").json()
            assert health["plan"]["images"] == {"max_images": 1, "max_bytes": 10 << 20, "max_pixels": 4096}
            assert health["load"]["plan_check"]["tries"][0]["images"] == 1  # the worst case it was warmed up with
