"""Tiny deterministic vision-language checkpoints (LLaVA, Idefics3), so image requests are tested offline.

Two tower shapes, the two ``memory/vision.py`` prices (``--arch llava|idefics3``); both load with
``AutoProcessor`` and ``AutoModelForImageTextToText`` and need no torchvision (Pillow's image processors):

- **llava**: a CLIP vision tower (``CLIPImageProcessorPil``), a two-layer projector and a Llama. Every image
  becomes the same number of tokens, ``(image_size / patch_size)²`` (16 here).
- **idefics3** (the shape of SmolVLM v1 checkpoints): a SigLIP-like tower on 32-pixel tiles, a pixel-shuffle
  connector (scale 2: 4 tokens a tile) and a Llama; ``Idefics3ImageProcessorPil`` resizes every image to a
  longest edge of 128 and cuts it into tiles of 32, plus the whole image as one more: a square image is
  4 × 4 + 1 = 17 tiles, 68 tokens, as SmolVLM-256M makes 17 tiles of 64 tokens from a 2048-pixel image.

Qwen2-VL is not among them: its processor needs a video processor, which needs torchvision, and the torchvision
built for torch 2.13.0 does not load against the CPU wheel this project installs (``torchvision::nms does not
exist``).

What is written: ``config.json``, ``generation_config.json``, ``model.safetensors``, the demo tokenizer with the
image tokens added, ``processor_config.json`` and a ChatML ``chat_template.jinja`` that places ``<image>``
where each image part is. Weights are drawn per tensor from a generator seeded by ``(seed, name)``, with the
demo models' large std (a random model at std 0.02 answers one token whatever the image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.checkpoint.demo_tokenizer import ENDOFTEXT, IM_END, IM_START, train_tokenizer
from memserve.checkpoint.staging import check_target, replace_with, staging_beside, tensor_seed
from memserve.errors import InvalidArgument

__all__ = [
    "IMAGE_TOKEN",
    "VISION_ARCHS",
    "VISION_CHAT_TEMPLATE",
    "DemoVisionInfo",
    "image_tokens_per_image",
    "write_demo_vision_model",
]

VISION_ARCHS = ("llava", "idefics3")
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32  # the tower's input: LLaVA's whole image, Idefics3's tile
PATCH_SIZE = 8
LONGEST_EDGE = 128  # Idefics3: every image is resized to this longest edge, then cut into tiles of IMAGE_SIZE
SCALE_FACTOR = 2  # Idefics3's pixel shuffle: a tile's 16 patches become 4 tokens
# Idefics3's processor writes these around each image's tiles; a real tokenizer has them as added tokens
_IDEFICS3_TOKENS = (
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)),
)
_VOCAB_SIZE = 1024  # the tiny demo model's
_INIT_STD = 0.3

VISION_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""The demo ChatML template, with ``<image>`` (one token, which the processor expands) for each image part."""


@dataclass(frozen=True)
class DemoVisionInfo:
    """What ``write_demo_vision_model`` wrote."""

    path: Path
    arch: str
    params: int
    vision_params: int  # the vision tower and the projector (connector)
    image_tokens: int  # per image
    seconds: float


def image_tokens_per_image(arch: str = "llava") -> int:
    """Tokens each image becomes in the demo model: LLaVA's patches (the CLS token is dropped, strategy
    "default"); Idefics3's tiles of a square image, each its patches over the pixel shuffle's scale²."""
    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    if arch == "idefics3":
        return ((LONGEST_EDGE // IMAGE_SIZE) ** 2 + 1) * patches // SCALE_FACTOR**2
    return patches


def write_demo_vision_model(path: Path, *, arch: str = "llava", seed: int = 0, force: bool = False) -> DemoVisionInfo:
    """Write the tiny fp32 ``arch`` (``VISION_ARCHS``) into ``path`` (deterministic by ``seed``) and say what was
    written.

    A non-empty ``path`` is refused unless ``force``; the checkpoint is built in a sibling folder and moved in
    at the end, so an interrupted build never looks complete.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    started = time.perf_counter()
    if not 0 <= seed < 2**32:
        raise InvalidArgument(f"seed must be between 0 and {2**32 - 1}, got {seed}", param="seed")
    if arch not in VISION_ARCHS:
        raise InvalidArgument(f"unknown vision arch {arch!r}: expected one of {', '.join(VISION_ARCHS)}", param="arch")
    path = Path(path)
    check_target(path, force=force)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(_VOCAB_SIZE),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IMAGE_TOKEN, *(_IDEFICS3_TOKENS if arch == "idefics3" else ())],
        chat_template=VISION_CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    pad_id, eos_id, image_id = (int(tokenizer.get_vocab()[t]) for t in (ENDOFTEXT, IM_END, IMAGE_TOKEN))
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        vocab_size=len(tokenizer),
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    model, processor = (_idefics3 if arch == "idefics3" else _llava)(tokenizer, text, image_id)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(_draw(name, tuple(tensor.shape), seed))
    generation = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False)

    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its "Writing model shards" bar is noise for one small file
    try:
        with staging_beside(path) as staging:
            processor.save_pretrained(staging)
            generation.save_pretrained(staging)
            model.save_pretrained(staging)
            replace_with(staging, path)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    params = sum(t.numel() for t in model.state_dict().values())
    towers = ("vision_tower", "multi_modal_projector", "vision_model", "connector")
    vision_params = sum(t.numel() for n, t in model.state_dict().items() if any(w in n for w in towers))
    tokens = image_tokens_per_image(arch)
    return DemoVisionInfo(path, arch, params, vision_params, tokens, time.perf_counter() - started)


def _llava(tokenizer: Any, text: Any, image_id: int) -> tuple[Any, Any]:
    """LLaVA: a 32-pixel CLIP tower with 8-pixel patches and a projector, on ``text``."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=image_tokens_per_image(),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        dtype="float32",
        architectures=["LlavaForConditionalGeneration"],
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=VISION_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" drops again
    )
    return LlavaForConditionalGeneration(config), processor


def _idefics3(tokenizer: Any, text: Any, image_id: int) -> tuple[Any, Any]:
    """Idefics3: a SigLIP-like tower on 32-pixel tiles, a pixel-shuffle connector, on ``text``; the processor
    resizes to a longest edge of ``LONGEST_EDGE`` and tiles by ``IMAGE_SIZE``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        text_config=text,
        scale_factor=SCALE_FACTOR,
        image_token_id=image_id,
        dtype="float32",
        architectures=["Idefics3ForConditionalGeneration"],
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(
            size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        image_seq_len=(IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2,
        chat_template=VISION_CHAT_TEMPLATE,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _draw(name: str, shape: tuple[int, ...], seed: int) -> object:
    """Biases zero, norm weights one (as transformers initialises them), the rest N(0, std) seeded by name."""
    import torch

    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.empty(shape).normal_(0.0, _INIT_STD, generator=generator)
