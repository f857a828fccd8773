"""A tiny deterministic vision-language checkpoint (LLaVA), so image requests are tested offline.

Why LLaVA: of the image-text-to-text classes the installed transformers has (LLaVA, Idefics3/SmolVLM,
Qwen2-VL, ...), it is the smallest that loads with ``AutoProcessor`` and ``AutoModelForImageTextToText`` and
needs no torchvision: a CLIP vision tower (Pillow's ``CLIPImageProcessorPil``), a two-layer projector and
a Llama. Every image becomes the same number of tokens, ``(image_size / patch_size)²`` (16 here), where
Idefics3 splits images into tiles and Qwen2-VL scales them, so its memory per image is one fixed figure
(``memory/vision.py``) and a test can say exactly how many tokens a prompt holds.

What is written: ``config.json`` (``LlavaForConditionalGeneration``, a 32-pixel CLIP tower with 8-pixel
patches, the tiny demo Llama), ``generation_config.json``, ``model.safetensors``, the demo tokenizer with
``<image>`` added, ``processor_config.json`` and a ChatML ``chat_template.jinja`` that places ``<image>``
where each image part is. Weights are drawn per tensor from a generator seeded by ``(seed, name)``, with the
demo models' large std (a random model at std 0.02 answers one token whatever the image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from memserve.checkpoint.demo_tokenizer import ENDOFTEXT, IM_END, IM_START, train_tokenizer
from memserve.checkpoint.staging import check_target, replace_with, staging_beside, tensor_seed
from memserve.errors import InvalidArgument

__all__ = ["IMAGE_TOKEN", "VISION_CHAT_TEMPLATE", "DemoVisionInfo", "image_tokens_per_image", "write_demo_vision_model"]

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
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
    params: int
    vision_params: int  # the CLIP tower and the projector
    image_tokens: int  # per image
    seconds: float


def image_tokens_per_image() -> int:
    """Tokens each image becomes in the demo model: its patches (the CLS token is dropped, strategy "default")."""
    return (IMAGE_SIZE // PATCH_SIZE) ** 2


def write_demo_vision_model(path: Path, *, seed: int = 0, force: bool = False) -> DemoVisionInfo:
    """Write the tiny fp32 LLaVA into ``path`` (deterministic by ``seed``) and say what was written.

    A non-empty ``path`` is refused unless ``force``; the checkpoint is built in a sibling folder and moved in
    at the end, so an interrupted build never looks complete.
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    started = time.perf_counter()
    if not 0 <= seed < 2**32:
        raise InvalidArgument(f"seed must be between 0 and {2**32 - 1}, got {seed}", param="seed")
    path = Path(path)
    check_target(path, force=force)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(_VOCAB_SIZE),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IMAGE_TOKEN],
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
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(_draw(name, tuple(tensor.shape), seed))
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
    vision_params = sum(
        t.numel() for n, t in model.state_dict().items() if "vision_tower" in n or "multi_modal_projector" in n
    )
    return DemoVisionInfo(path, params, vision_params, image_tokens_per_image(), time.perf_counter() - started)


def _draw(name: str, shape: tuple[int, ...], seed: int) -> object:
    """Biases zero, norm weights one (as transformers initialises them), the rest N(0, std) seeded by name."""
    import torch

    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.empty(shape).normal_(0.0, _INIT_STD, generator=generator)
