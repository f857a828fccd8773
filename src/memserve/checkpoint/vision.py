"""Whether a checkpoint reads images, from its ``config.json`` alone (torch-free: the gateway's door asks).

A vision-language checkpoint (LLaVA, Idefics3/SmolVLM, Qwen2-VL, Gemma 3, PaliGemma, Mllama, ...) nests a
``vision_config`` and names a generating class (``...ForConditionalGeneration``, ``...ForImageTextToText``,
or a causal LM); a CLIP or SigLIP dual encoder also nests one but generates nothing, so it does not count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memserve.errors import InvalidArgument
from memserve.wire.schema import ImageRef

__all__ = ["GENERATING_SUFFIXES", "NoImages", "image_token_id", "no_images", "takes_images"]

GENERATING_SUFFIXES = ("ForConditionalGeneration", "ForImageTextToText", "ForCausalLM")


def takes_images(config: Mapping[str, Any]) -> bool:
    """True for a checkpoint whose model reads images and writes text: a vision config and a generating class."""
    if not isinstance(config.get("vision_config"), Mapping):
        return False
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        return isinstance(config.get("text_config"), Mapping)  # an old config without its class: LLaVA-like
    return any(isinstance(a, str) and a.endswith(GENERATING_SUFFIXES) for a in architectures)


def image_token_id(config: Mapping[str, Any]) -> int | None:
    """The id the processor puts where an image's features go (``image_token_id``, LLaVA's older
    ``image_token_index``), or None."""
    for key in ("image_token_id", "image_token_index"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class NoImages(InvalidArgument):
    """A request with images for a model that reads only text."""

    code = "model_takes_no_images"


def no_images(model: str, images: list[ImageRef]) -> NoImages | None:
    """The 400 for ``images`` sent to ``model``, a text-only model (None when there are no images).

    The gateway's door raises it before any load, and a text-only runner raises it too, so both answer alike."""
    if not images:
        return None
    count = f"{len(images)} image{'s' if len(images) > 1 else ''}"
    return NoImages(
        f"the model '{model}' takes no images (it is a text-only model), but this request has {count}; "
        "remove the image_url parts, or send them to a vision-language model",
        param=images[0].param,
    )
