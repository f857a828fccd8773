"""Which prepared image requests share one ``generate`` call, and what their stacked image tensors are: a tiling
processor's (Idefics3) rows with different tile counts stack padded exactly as the processor pads a batch."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from memserve.runner.vision import ImageGenerationRequest, ImageTextEngine, _held, _stacked
from memserve.wire.events import GenerationRequest
from tests.vision.helpers import png

RED, BLUE = png(50, 40, (200, 10, 30)), png(31, 77, (10, 30, 200))  # Idefics3's demo: 17 tiles and 9


def _prepared(model_dir: Path, images: list[list[bytes]]) -> tuple[Any, list[ImageGenerationRequest]]:
    """The processor, and one request per row as the runner prepares it (its tensors as ``_held`` keeps them)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    requests = []
    for i, row in enumerate(images):
        inputs = _held(
            processor(images=[_image(b) for b in row] or None, text=_prompt(processor, row), return_tensors="pt")
        )
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        requests.append(
            ImageGenerationRequest(request_id=str(i), prompt_ids=tuple(ids), max_new_tokens=4, inputs=inputs)
        )
    return processor, requests


def _image(data: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _prompt(processor: Any, images: list[bytes]) -> str:
    content: Any = [*({"type": "image"} for _ in images), {"type": "text", "text": "what is it?"}]
    return str(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))


def test_idefics3_rows_with_different_tile_counts_share_a_call_padded_as_the_processor_pads(
    tiny_idefics3_dir: Path,
) -> None:
    processor, (red, blue, both) = _prepared(tiny_idefics3_dir, [[RED], [BLUE], [BLUE, RED]])
    tiles = [r.inputs["pixel_values"].shape[1] for r in (red, blue, both)]
    assert tiles == [17, 9, 26], "the rows should differ in tiles, or the test proves nothing"
    keys = {ImageTextEngine._decoding(r) for r in (red, blue, both)}
    assert len(keys) == 1  # one call for all three
    stacked = _stacked([red, blue, both], "cpu", torch.float32)
    rows = [[RED], [BLUE], [BLUE, RED]]
    processor.tokenizer.padding_side = "left"  # as the engine pads its rows for generate
    batch = _held(
        processor(
            images=[[_image(b) for b in row] for row in rows],
            text=[_prompt(processor, row) for row in rows],
            return_tensors="pt",
            padding=True,
        )
    )
    assert set(stacked) == {"pixel_values", "pixel_attention_mask"}
    assert torch.equal(stacked["pixel_values"], batch["pixel_values"])
    assert torch.equal(stacked["pixel_attention_mask"], batch["pixel_attention_mask"])
    # the padded rows read as the processor's batch: greedy tokens equal each row's generate alone
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_idefics3_dir, dtype=torch.float32)
    with torch.inference_mode():
        together = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **stacked,
            max_new_tokens=6,
            do_sample=False,
        )[:, batch["input_ids"].shape[1] :]
        for i, request in enumerate((red, blue, both)):
            alone = model.generate(
                input_ids=torch.tensor([request.prompt_ids]), **request.inputs, max_new_tokens=6, do_sample=False
            )[0, len(request.prompt_ids) :]
            assert together[i].tolist() == alone.tolist(), i


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_a_row_with_images_never_shares_a_call_with_one_without(arch: str, request: pytest.FixtureRequest) -> None:
    model_dir = Path(request.getfixturevalue("tiny_vision_dir" if arch == "llava" else "tiny_idefics3_dir"))
    _, (with_image, other_image) = _prepared(model_dir, [[RED], [BLUE, RED]])
    text = GenerationRequest(request_id="t", prompt_ids=with_image.prompt_ids, max_new_tokens=4)
    assert ImageTextEngine._decoding(with_image) == ImageTextEngine._decoding(other_image)  # LLaVA: more images
    assert ImageTextEngine._decoding(with_image) != ImageTextEngine._decoding(text)
