"""Whether a checkpoint reads images, from its ``config.json`` alone (torch-free: the gateway's door asks).

A vision-language checkpoint (LLaVA, Idefics3/SmolVLM, Qwen2-VL, Gemma 3, PaliGemma, Mllama, ...) nests a
``vision_config`` and names a generating class (``...ForConditionalGeneration``, ``...ForImageTextToText``,
or a causal LM); a CLIP or SigLIP dual encoder also nests one but generates nothing, so it does not count.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.errors import InvalidArgument
from memserve.wire.schema import ImageRef

__all__ = [
    "GENERATING_SUFFIXES",
    "NoImages",
    "VisionFacts",
    "image_processor_config",
    "image_token_id",
    "language_model_regex",
    "language_model_scope",
    "no_images",
    "takes_images",
]

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


def image_processor_config(folder: Path) -> dict[str, Any]:
    """The image processor's settings saved beside a checkpoint: ``preprocessor_config.json`` (the older file), or
    the ``image_processor`` entry of ``processor_config.json`` (what transformers 5 writes); {} when neither is
    there or readable (the tower is then priced with its class's defaults)."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        found = data.get(key) if key is not None and isinstance(data, dict) else data
        if isinstance(found, dict):
            return found
    return {}


def _edge(settings: Mapping[str, Any], key: str, default: int) -> int:
    value = settings.get(key)
    edge = value.get("longest_edge") if isinstance(value, Mapping) else None
    return edge if isinstance(edge, int) and not isinstance(edge, bool) and edge > 0 else default


@dataclass(frozen=True)
class VisionFacts:
    """The vision tower's dimensions, from ``vision_config``: what ``memory/vision.py`` prices per image.

    Its weights are not here: they are in the safetensors headers with the rest (``CheckpointFacts``).

    Two tower shapes are read. A LLaVA-like tower (CLIP, SigLIP) takes each image whole, resized to
    ``image_size``: one tile. An Idefics3 tower (Idefics3, SmolVLM v1) takes tiles: its processor resizes each
    image so its longest edge is ``size.longest_edge`` (small images too), cuts it into tiles of
    ``max_image_size.longest_edge`` (the tower's ``image_size``) and adds the whole image at tile size, so a square
    image is ``n² + 1`` tiles with ``n = ceil(longest_edge / tile)``; each tile becomes ``patches / scale_factor²``
    tokens (pixel shuffle). SmolVLM-256M: 2048 / 512 → 17 tiles of 64 tokens, 1,088 tokens an image.
    """

    image_size: int  # pixels per side of one tile, the tower's input
    patch_size: int
    channels: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    image_tokens: int  # tokens one image becomes in the language model's prompt (all its tiles)
    text_hidden_size: int
    tiles: int = 1  # tower inputs one image becomes at most
    resized_pixels: int = 0  # pixels the processor resizes every image to before tiling; 0: no larger than sent

    @property
    def patches(self) -> int:
        """Positions one tile has in the tower: its patches and a class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any], processor: Mapping[str, Any] | None = None) -> VisionFacts | None:
        """None for a checkpoint that takes no images, or whose tower is not a ViT with fixed-size inputs
        (``image_size`` and ``patch_size``, as CLIP and SigLIP towers have). ``processor`` is the image
        processor's saved settings (``image_processor_config``), which say how an Idefics3 tower tiles images."""
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
        tokens = tokens if isinstance(tokens, int) and tokens > 0 else side * side
        tiles, resized = 1, 0
        scale = config.get("scale_factor")
        if isinstance(scale, int) and not isinstance(scale, bool) and scale > 0:  # Idefics3: tiles, pixel shuffle
            settings = processor or {}
            tile = _edge(settings, "max_image_size", dims["image_size"])
            longest = _edge(settings, "size", 4 * tile)  # the image processor's default, 4 × 364
            split = math.ceil(longest / tile)
            splits = settings.get("do_image_splitting", True) is not False and split > 1
            tiles = split * split + 1 if splits else 1
            resized = longest * longest if splits else tile * tile
            tokens = tiles * (side * side // (scale * scale))
        channels = vision.get("num_channels")
        return cls(
            image_size=dims["image_size"],
            patch_size=dims["patch_size"],
            channels=channels if isinstance(channels, int) and channels > 0 else 3,
            hidden_size=dims["hidden_size"],
            intermediate_size=dims["intermediate_size"],
            layers=dims["num_hidden_layers"],
            heads=dims["num_attention_heads"],
            image_tokens=tokens,
            text_hidden_size=dims["text"],
            tiles=tiles,
            resized_pixels=resized,
        )


def language_model_scope(model: Any) -> tuple[str, ...]:
    """The module paths of a loaded vision-language model's language model (its decoder, ``get_decoder``, and the
    LM head), as ``LoraBank.scope`` prefixes: where memserve puts LoRA adapters on such a model (the tower's batch
    is its images, not the rows an adapter is routed by); () when the model names no decoder apart from itself."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        return ()
    paths = [name for name, module in model.named_modules() if module is decoder]
    if not paths:
        return ()
    return (f"{paths[0]}.", "lm_head")


def language_model_regex(scope: tuple[str, ...], targets: Iterable[str]) -> str:
    """PEFT's ``target_modules`` as a regex that matches ``targets`` in the language model of ``scope`` only."""
    names = "|".join(re.escape(t) for t in targets)
    return f"^{re.escape(scope[0])}.*\\.({names})$"


class NoImages(InvalidArgument):
    """A request with images for a model that reads only text."""

    code = "model_takes_no_images"


def no_images(model: str, images: list[ImageRef], config: Mapping[str, Any] | None = None) -> NoImages | None:
    """The 400 for ``images`` sent to ``model``, which memserve serves as text (None when there are no images).

    ``config`` (its ``config.json``) tells a text-only model from a vision-language one whose tower memserve does
    not price yet (Qwen2-VL's images at a variable resolution, a tower with no fixed ``image_size``): the answer
    says which. The gateway's door raises it before any load, and a text-only runner raises it too."""
    if not images:
        return None
    count = f"{len(images)} image{'s' if len(images) > 1 else ''}"
    if config is not None and takes_images(config):
        kind = config.get("model_type", "this architecture")
        return NoImages(
            f"the model '{model}' is a vision-language model ({kind}), but memserve does not read images for its "
            f"vision tower yet (only towers with a fixed image size: LLaVA-like and Idefics3/SmolVLM), so it is "
            f"served as text and this request's {count} cannot be read; remove the image_url parts, or serve this "
            "model with vLLM (runner: vllm)",
            param=images[0].param,
        )
    return NoImages(
        f"the model '{model}' takes no images (it is a text-only model), but this request has {count}; "
        "remove the image_url parts, or send them to a vision-language model",
        param=images[0].param,
    )
