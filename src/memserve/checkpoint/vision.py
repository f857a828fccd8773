"""Whether a checkpoint reads images, from its ``config.json`` alone (torch-free: the gateway's door asks).

A vision-language checkpoint (LLaVA, Idefics3/SmolVLM, Qwen2-VL, Gemma 3, PaliGemma, Mllama, ...) nests a
``vision_config`` and names a generating class (``...ForConditionalGeneration``, ``...ForImageTextToText``,
or a causal LM); a CLIP or SigLIP dual encoder also nests one but generates nothing, so it does not count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memserve.errors import InvalidArgument
from memserve.wire.schema import ImageRef

__all__ = ["GENERATING_SUFFIXES", "NoImages", "VisionFacts", "image_token_id", "no_images", "takes_images"]

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


@dataclass(frozen=True)
class VisionFacts:
    """The vision tower's dimensions, from ``vision_config``: what ``memory/vision.py`` prices per image.

    Its weights are not here: they are in the safetensors headers with the rest (``CheckpointFacts``).
    """

    image_size: int  # pixels per side the processor resizes every image to
    patch_size: int
    channels: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    image_tokens: int  # tokens one image becomes in the language model's prompt
    text_hidden_size: int

    @property
    def patches(self) -> int:
        """Positions one image has in the tower: its patches and a class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VisionFacts | None:
        """None for a checkpoint that takes no images, or whose tower is not a ViT with fixed-size inputs
        (``image_size`` and ``patch_size``, as CLIP and SigLIP towers have)."""
        vision = config.get("vision_config")
        if not takes_images(config) or not isinstance(vision, Mapping):
            return None
        text = config.get("text_config")
        text = text if isinstance(text, Mapping) else config
        keys = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        found = {key: vision.get(key) for key in (*keys, "num_attention_heads")} | {"text": text.get("hidden_size")}
        dims: dict[str, int] = {k: v for k, v in found.items() if isinstance(v, int) and not isinstance(v, bool)}
        if len(dims) < len(found) or min(dims.values()) < 1:
            return None
        side = dims["image_size"] // dims["patch_size"]
        tokens = config.get("image_seq_length")
        channels = vision.get("num_channels")
        return cls(
            image_size=dims["image_size"],
            patch_size=dims["patch_size"],
            channels=channels if isinstance(channels, int) and channels > 0 else 3,
            hidden_size=dims["hidden_size"],
            intermediate_size=dims["intermediate_size"],
            layers=dims["num_hidden_layers"],
            heads=dims["num_attention_heads"],
            image_tokens=tokens if isinstance(tokens, int) and tokens > 0 else side * side,
            text_hidden_size=dims["text"],
        )


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
