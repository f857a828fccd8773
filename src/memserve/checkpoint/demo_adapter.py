"""A deterministic random LoRA adapter for a demo model, written with PEFT, for tests and benchmarks.

On a vision-language base (``memserve demo-model --arch llava|idefics3``) the targets are matched in its
language model only, by a regex (``target_modules``), as an adapter memserve serves there must be.

PEFT initialises ``lora_B`` to zeros (a fresh adapter changes nothing); here both A and B are drawn
from a generator seeded with ``seed``, so the adapter changes the model's answers, and the same base,
options and seed give byte-identical weights. torch, transformers and PEFT are imported when called:
this module sits in checkpoint/, which the gateway may import.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from memserve.errors import CheckpointError, InvalidArgument

__all__ = ["DEFAULT_TARGETS", "DemoAdapterInfo", "write_demo_adapter"]

DEFAULT_TARGETS = ("q_proj", "v_proj")
B_STD = 0.5  # lora_B's spread: large enough that greedy answers change on the tiny demo model


@dataclass(frozen=True)
class DemoAdapterInfo:
    path: Path
    base: str
    rank: int
    targets: tuple[str, ...]
    modules: int
    params: int
    weights_bytes: int
    seconds: float


def write_demo_adapter(
    base: str | Path,
    out: Path,
    *,
    rank: int = 8,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    seed: int = 0,
    alpha: int | None = None,
) -> DemoAdapterInfo:
    """Write a LoRA adapter for the model at ``base`` into ``out`` (PEFT's ``save_pretrained`` layout), or, when
    ``out`` ends in ``.gguf``, that adapter converted into one GGUF LoRA file for llama.cpp
    (``demo_gguf.convert_demo_adapter``: the base must be a demo llama or qwen2 checkpoint).

    ``alpha`` defaults to ``2 × rank`` (scale 2). A target no module of the base has is refused by PEFT's
    own check, reworded; ``out`` must be empty or absent.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from memserve.checkpoint.facts import read_config
    from memserve.checkpoint.vision import language_model_regex, language_model_scope, takes_images

    started = time.perf_counter()
    if rank < 1:
        raise InvalidArgument(f"rank must be at least 1, got {rank}", param="rank")
    if not targets or any(not t for t in targets):
        raise InvalidArgument("targets must name at least one module, e.g. q_proj,v_proj", param="targets")
    if not 0 <= seed < 2**32:
        raise InvalidArgument(f"seed must be in [0, 2**32), got {seed}", param="seed")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgument(f"{out} exists and is not an empty folder; pick a new path", param="out")
    if out.suffix == ".gguf":
        from memserve.checkpoint.demo_gguf import convert_demo_adapter

        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="memserve-adapter-", dir=out.parent.absolute()) as staging:
            made = write_demo_adapter(base, Path(staging) / "peft", rank=rank, targets=targets, seed=seed, alpha=alpha)
            partial = Path(staging) / out.name
            convert_demo_adapter(made.path, Path(base), partial)
            os.replace(partial, out)  # whole or not at all
        return replace(made, path=out, weights_bytes=out.stat().st_size, seconds=time.perf_counter() - started)
    base = str(Path(base).absolute()) if Path(base).is_dir() else str(base)  # the config names the base it was made on
    vision = Path(base).is_dir() and takes_images(read_config(Path(base), source=base))
    model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(base)
    scope = language_model_scope(model) if vision else ()
    # a vision-language base: the targets in its language model only (memserve's LoraBank serves no others)
    target_modules: list[str] | str = language_model_regex(scope, targets) if scope else list(targets)
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=target_modules, lora_dropout=0.0
    )
    try:
        with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5.24 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise CheckpointError(f"cannot put LoRA on {base} with targets {','.join(targets)}: {exc}") from exc
    generator = torch.Generator().manual_seed(seed)
    params = 0
    modules = 0
    with torch.no_grad():
        for name, parameter in sorted(peft_model.named_parameters()):
            if "lora_A" in name:
                fan_in = parameter.shape[1]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
                modules += 1
            elif "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * B_STD / rank**0.5)
            else:
                continue
            params += parameter.numel()
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    weights = out / "adapter_model.safetensors"
    return DemoAdapterInfo(
        path=out,
        base=str(base),
        rank=rank,
        targets=tuple(targets),
        modules=modules,
        params=params,
        weights_bytes=weights.stat().st_size,
        seconds=time.perf_counter() - started,
    )
