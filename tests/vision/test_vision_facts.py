"""Which checkpoints read images, what their towers are, and what images cost a plan: pure tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memserve.checkpoint.demo_vision import image_tokens_per_image
from memserve.checkpoint.facts import read_local_facts
from memserve.checkpoint.vision import VisionFacts, image_processor_config, no_images, takes_images
from memserve.engines.fit import fit_result
from memserve.memory.planner import Plan
from memserve.memory.probe import probe_inventory
from memserve.memory.vision import (
    BODY_COPIES,
    HELD_BYTES_PER_PIXEL,
    RESIZED_BYTES_PER_PIXEL,
    WORKING_BYTES_PER_PIXEL,
    ImageCost,
    image_cost,
)
from memserve.wire.images import ImageLimits
from memserve.wire.schema import ImageRef

CLIP = {"image_size": 336, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16}  # fmt: skip
LLAVA = {
    "architectures": ["LlavaForConditionalGeneration"],
    "vision_config": CLIP,
    "text_config": {"hidden_size": 4096},
}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LLAVA, True),
        ({"architectures": ["Idefics3ForConditionalGeneration"], "vision_config": {}}, True),
        ({"architectures": ["Qwen2VLForConditionalGeneration"], "vision_config": {"depth": 32}}, True),
        ({"architectures": ["Gemma3ForConditionalGeneration"], "vision_config": {}, "text_config": {}}, True),
        ({"vision_config": {}, "text_config": {}}, True),  # an old config that names no class: LLaVA-like
        ({"architectures": ["CLIPModel"], "vision_config": {}, "text_config": {}}, False),  # encodes, writes nothing
        ({"architectures": ["LlamaForCausalLM"]}, False),
        ({"architectures": ["T5ForConditionalGeneration"]}, False),
        ({"architectures": ["LlavaForConditionalGeneration"], "vision_config": "clip"}, False),
    ],
)
def test_takes_images(config: dict[str, Any], expected: bool) -> None:
    assert takes_images(config) is expected


def test_vision_facts_of_llava_1_5() -> None:
    facts = VisionFacts.from_config({**LLAVA, "image_seq_length": 576})
    assert facts is not None
    assert (facts.patches, facts.image_tokens, facts.text_hidden_size) == (24 * 24 + 1, 576, 4096)
    assert VisionFacts.from_config({**LLAVA, "vision_config": {"depth": 32}}) is None  # no fixed size: not priced
    assert VisionFacts.from_config({"architectures": ["LlamaForCausalLM"]}) is None


# SmolVLM-256M-Instruct (model_type idefics3): a SigLIP tower on 512-pixel tiles, pixel shuffle by 4, a 576-wide
# SmolLM; its processor resizes to a longest edge of 2048 and tiles by 512 (64 tokens a tile)
SIGLIP = {"image_size": 512, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
          "num_hidden_layers": 12, "num_attention_heads": 12}  # fmt: skip
SMOLVLM = {
    "architectures": ["Idefics3ForConditionalGeneration"],
    "model_type": "idefics3",
    "scale_factor": 4,
    "vision_config": SIGLIP,
    "text_config": {"hidden_size": 576},
}
SMOLVLM_PROCESSOR = {
    "do_image_splitting": True,
    "size": {"longest_edge": 2048},
    "max_image_size": {"longest_edge": 512},
}


@pytest.mark.parametrize(
    ("processor", "tiles", "tokens", "resized"),
    [
        (SMOLVLM_PROCESSOR, 17, 17 * 64, 2048 * 2048),
        ({}, 17, 17 * 64, 2048 * 2048),  # no saved settings: the image processor's default, 4 tiles a side
        ({"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 512}}, 10, 10 * 64, 1536 * 1536),
        (SMOLVLM_PROCESSOR | {"do_image_splitting": False}, 1, 64, 512 * 512),
    ],
)
def test_vision_facts_of_a_tiling_tower(processor: dict[str, Any], tiles: int, tokens: int, resized: int) -> None:
    facts = VisionFacts.from_config(SMOLVLM, processor)
    assert facts is not None
    assert (facts.tiles, facts.image_tokens, facts.resized_pixels) == (tiles, tokens, resized)
    assert (facts.image_size, facts.text_hidden_size) == (512, 576)


def test_a_tiling_tower_prices_every_tile_its_mask_and_the_resize() -> None:
    facts = VisionFacts.from_config(SMOLVLM, SMOLVLM_PROCESSOR)
    one_tile = VisionFacts.from_config(SMOLVLM, SMOLVLM_PROCESSOR | {"do_image_splitting": False})
    assert facts is not None and one_tile is not None
    cost = image_cost(facts, "bfloat16", images=2, max_pixels=1024 * 1024, concurrency=3, waiting=1)
    single = image_cost(one_tile, "bfloat16", images=2, max_pixels=1024 * 1024, concurrency=3, waiting=1)
    assert cost.tower_bytes == 17 * single.tower_bytes
    in_flight, held = 3 * 2, 4 * 2
    values, mask = 17 * 3 * 512 * 512, 17 * 512 * 512  # float32 pixel values; the mask as one byte a pixel
    assert cost.pixel_bytes == held * (values * 4 + mask) + in_flight * (values * 2 + mask)
    resize = 2 * 2048 * 2048 * RESIZED_BYTES_PER_PIXEL  # the processor's work at 2048², every image at once
    assert cost.decoded_bytes == 1024 * 1024 * (2 * HELD_BYTES_PER_PIXEL + WORKING_BYTES_PER_PIXEL) + resize
    assert cost.feature_bytes == in_flight * 17 * 64 * (768 + 2 * 576) * 2


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"preprocessor_config.json": SMOLVLM_PROCESSOR}, SMOLVLM_PROCESSOR),
        ({"processor_config.json": {"image_processor": SMOLVLM_PROCESSOR, "image_seq_len": 64}}, SMOLVLM_PROCESSOR),
        ({"processor_config.json": {"image_seq_len": 64}}, {}),
        ({"preprocessor_config.json": "not json"}, {}),
        ({}, {}),
    ],
)
def test_image_processor_config(tmp_path: Path, files: dict[str, Any], expected: dict[str, Any]) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    assert image_processor_config(tmp_path) == expected


def test_the_demo_idefics3_plans_its_tiles_from_its_processor(tiny_idefics3_dir: Path) -> None:
    facts = read_local_facts(tiny_idefics3_dir)
    assert facts.vision is not None
    assert (facts.vision.tiles, facts.vision.image_tokens) == (17, image_tokens_per_image("idefics3")) == (17, 68)


def test_a_text_model_refuses_images_naming_itself_and_the_part() -> None:
    assert no_images("tiny", []) is None
    refused = no_images("tiny", [ImageRef("messages[0].content[1].image_url", "data:"), ImageRef("x", "y")])
    assert refused is not None and refused.status_code == 400 and refused.code == "model_takes_no_images"
    assert refused.param == "messages[0].content[1].image_url"
    assert "the model 'tiny' takes no images" in refused.message and "2 images" in refused.message
    qwen2_vl = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "vision_config": {}}
    unread = no_images("qvl", [ImageRef("messages[0].content[0].image_url", "data:")], qwen2_vl)
    assert unread is not None and unread.code == "model_takes_no_images"
    assert "'qvl' is a vision-language model (qwen2_vl), but memserve does not read images" in unread.message
    refused_as_text = no_images("tiny", [ImageRef("x", "y")], {"architectures": ["LlamaForCausalLM"]})
    assert refused_as_text is not None and "text-only model" in refused_as_text.message


@pytest.mark.parametrize(
    ("images", "max_pixels", "concurrency", "decoded"),
    [
        (0, 2048 * 2048, 1, 0),
        (1, 2048 * 2048, 1, 2048 * 2048 * (HELD_BYTES_PER_PIXEL + WORKING_BYTES_PER_PIXEL)),
        (4, 2048 * 2048, 1, 2048 * 2048 * (4 * HELD_BYTES_PER_PIXEL + WORKING_BYTES_PER_PIXEL)),
        (4, 2048 * 2048, 8, 2048 * 2048 * (4 * HELD_BYTES_PER_PIXEL + WORKING_BYTES_PER_PIXEL)),  # one at a time
    ],
)
def test_image_cost(images: int, max_pixels: int, concurrency: int, decoded: int) -> None:
    vision = VisionFacts.from_config(LLAVA)
    assert vision is not None
    cost = image_cost(vision, "bfloat16", images=images, max_pixels=max_pixels, concurrency=concurrency)
    assert cost.decoded_bytes == decoded
    in_flight = images * concurrency
    assert cost.pixel_bytes == in_flight * 3 * 336 * 336 * (4 + 2)
    assert cost.feature_bytes == in_flight * 576 * (1024 + 2 * 4096) * 2
    patches = 577
    assert cost.tower_bytes == in_flight * (patches * (6 * 1024 + 2 * 4096) * 2 + 16 * patches * patches * 6)
    assert cost.total_bytes == cost.decoded_bytes + cost.pixel_bytes + cost.tower_bytes + cost.feature_bytes


def test_the_demo_vision_model_plans_as_image_text_with_its_tower_in_the_weights(tiny_vision_dir: Path) -> None:
    config = json.loads((tiny_vision_dir / "config.json").read_text())
    assert takes_images(config)
    facts = read_local_facts(tiny_vision_dir)
    assert facts.vision is not None and facts.vision.image_tokens == 16
    assert facts.params == 247_744  # tower, projector and language model, from the header
    _, request, result = fit_result(
        str(tiny_vision_dir), context=512, concurrency=2, inventory=probe_inventory(memory="cpu=4GiB")
    )
    assert request.engine == "image-text" and result.plan is not None and result.plan.engine == "image-text"
    limits = ImageLimits()
    images = image_cost(facts.vision, "float32", images=limits.max_images, max_pixels=limits.max_pixels, concurrency=2)
    assert result.plan.devices["cpu"].activation_bytes > images.total_bytes > 0


def test_one_body_is_priced_and_waiting_requests_add_their_pixel_values() -> None:
    vision = VisionFacts.from_config(LLAVA)
    assert vision is not None
    body = 16 * 1024 * 1024

    def cost(**extra: int) -> ImageCost:
        return image_cost(vision, "float32", images=4, max_pixels=1024, concurrency=2, **extra)

    assert cost().body_bytes == 0
    # the runner prepares one body at a time (ImageCompleter.preparing), at any concurrency and queue
    assert (
        cost(max_body_bytes=body).body_bytes == cost(max_body_bytes=body, waiting=10).body_bytes == BODY_COPIES * body
    )
    # a waiting request holds its float32 pixel_values, not the model-dtype copy nor the tower's work
    added = cost(waiting=10).total_bytes - cost().total_bytes
    assert added == cost(waiting=10).pixel_bytes - cost().pixel_bytes == 10 * 4 * 3 * 336 * 336 * 4


def test_an_image_text_plan_prices_the_caps_it_is_given_and_carries_them_to_its_runner(tiny_vision_dir: Path) -> None:
    def plan_for(images: ImageLimits) -> Plan:
        _, request, result = fit_result(
            str(tiny_vision_dir),
            context=512,
            concurrency=2,
            images=images,
            inventory=probe_inventory(memory="cpu=4GiB"),
        )
        assert result.plan is not None and request.to_json()["images"]["max_images"] == images.max_images
        return result.plan

    small, default, large = (
        plan_for(ImageLimits(max_images=1, max_pixels=64 * 64)),
        plan_for(ImageLimits()),
        plan_for(ImageLimits(max_images=8, max_pixels=4096 * 4096)),
    )
    totals = [p.devices["cpu"].activation_bytes for p in (small, default, large)]
    assert totals == sorted(totals) and len(set(totals)) == 3, totals
    assert default.images == ImageLimits()
    assert Plan.from_json(large.to_json()).images == ImageLimits(max_images=8, max_pixels=4096 * 4096)
    assert Plan.from_json(large.to_json()) == large
