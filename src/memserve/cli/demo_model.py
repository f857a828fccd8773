"""``memserve demo-model PATH``: write a deterministic demo checkpoint for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import click

from memserve.checkpoint.demo import ARCHS, DTYPES, SIZES, write_demo_model
from memserve.checkpoint.demo_encoder import ENCODER_ARCHS, POOLINGS, TASKS, write_demo_encoder
from memserve.checkpoint.demo_gguf import GGUF_TYPES, write_demo_gguf
from memserve.checkpoint.demo_vision import VISION_ARCHS
from memserve.errors import MemserveError
from memserve.units import format_bytes


def _choices(names: Iterable[str]) -> str:
    return "[" + "|".join(names) + "]"


# Size, arch, dtype and seed are checked by write_demo_model, not by click.Choice/IntRange, so a bad
# value gives the same one-line error from the CLI as from the library.
@click.command("demo-model")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--size",
    metavar=_choices(SIZES),
    default="tiny",
    show_default=True,
    help="tiny: 0.2M params (tests); small: 100M; 1b: 1.5B (benchmarks).",
)
@click.option(
    "--arch",
    metavar=_choices((*ARCHS, *ENCODER_ARCHS, *VISION_ARCHS)),
    default="llama",
    show_default=True,
    help="Model family; qwen2 ties embeddings and has attention biases; bert and electra are encoders (--task); "
    "llava and idefics3 read images (tiny, fp32 only; idefics3 cuts them into tiles, as SmolVLM does).",
)
@click.option(
    "--task",
    metavar=_choices(TASKS),
    default=None,
    help="Encoders only: embed (sentence-transformers files, /v1/embeddings) or classify (/v1/classify)  "
    "[default: embed]",
)
@click.option("--labels", default=None, help="classify: the class names in id order, comma-separated (spam,ham).")
@click.option(
    "--pooling", metavar=_choices(POOLINGS), default="mean", show_default=True, help="embed: the declared pooling."
)
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="embed: unit-length vectors.")
@click.option(
    "--matryoshka",
    default=None,
    help="embed: the sizes the model allows as `dimensions`, comma-separated (16,32).",
)
@click.option(
    "--dtype",
    metavar=_choices(DTYPES),
    default=None,
    help="Weight dtype  [default: float32 for tiny, bfloat16 otherwise]",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="0 to 2**32-1; the same seed and options give byte-identical weights.",
)
@click.option("--force", is_flag=True, help="Replace the checkpoint files in a non-empty PATH.")
@click.option(
    "--format",
    "fmt",
    metavar="[safetensors|gguf]",
    default="safetensors",
    show_default=True,
    help="gguf: one file for llama.cpp at PATH (ending in .gguf), the same weights.",
)
@click.option(
    "--gguf-type",
    metavar=_choices(GGUF_TYPES),
    default=None,
    help="The GGUF file's weight type  [default: the dtype's own]",
)
@click.option(
    "--gguf-split-tensors",
    type=click.IntRange(min=1),
    default=None,
    help="Split the GGUF model into files of at most this many tensors (NAME-00001-of-0000N.gguf, as gguf-split).",
)
@click.option(
    "--gguf-experts",
    type=click.IntRange(min=2),
    default=None,
    help="Write a mixture-of-experts GGUF (llama only): each MLP as this many experts, 2 used per token.",
)
def demo_model(
    path: Path,
    size: str,
    arch: str,
    task: str | None,
    labels: str | None,
    pooling: str,
    normalize: bool,
    matryoshka: str | None,
    dtype: str | None,
    seed: int,
    force: bool,
    fmt: str,
    gguf_type: str | None,
    gguf_split_tensors: int | None,
    gguf_experts: int | None,
) -> None:
    """Write a random-weight checkpoint with a locally trained tokenizer and a chat template to PATH.

    Nothing is downloaded; the result loads with transformers' from_pretrained like any hub model, or, with
    --format gguf, with llama.cpp's llama-server.
    """
    try:
        known = (*ARCHS, *ENCODER_ARCHS, *VISION_ARCHS)
        if arch not in known:
            raise click.ClickException(f"unknown arch {arch!r}: expected one of {', '.join(known)}")
        if arch in ENCODER_ARCHS:
            _encoder(path, arch, task, size, labels, pooling, normalize, matryoshka, dtype, seed, force, fmt)
            return
        if task is not None or labels is not None or matryoshka is not None:
            raise click.ClickException("--task, --labels and --matryoshka apply to the encoders (--arch bert|electra)")
        if fmt not in ("safetensors", "gguf"):
            raise click.ClickException(f"unknown format {fmt!r}: expected safetensors or gguf")
        if fmt == "gguf":
            gguf = write_demo_gguf(
                path,
                size=size,
                arch=arch,
                dtype=dtype,
                gguf_type=gguf_type,
                seed=seed,
                force=force,
                split_tensors=gguf_split_tensors or 0,
                experts=gguf_experts or 0,
            )
            click.echo(
                f"wrote {gguf.path}: {gguf.arch} {gguf.size} {gguf.gguf_type} GGUF, {gguf.params:,} params, "
                f"{format_bytes(gguf.file_bytes)}"
            )
            return
        if gguf_type is not None or gguf_split_tensors is not None or gguf_experts is not None:
            raise click.ClickException(
                "--gguf-type, --gguf-split-tensors and --gguf-experts apply to --format gguf only"
            )
        if arch in VISION_ARCHS:
            from memserve.checkpoint.demo_vision import write_demo_vision_model

            vision = write_demo_vision_model(path, arch=arch, seed=seed, force=force)
            click.echo(
                f"wrote {vision.path}: {vision.arch} tiny float32, {vision.params:,} params "
                f"({vision.vision_params:,} in the vision tower and projector), {vision.image_tokens} tokens per "
                f"image, {vision.seconds:.1f} s"
            )
            return
        info = write_demo_model(path, size=size, arch=arch, dtype=dtype, seed=seed, force=force)
    except MemserveError as exc:
        raise click.ClickException(exc.message) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from exc
    click.echo(
        f"wrote {info.path}: {info.arch} {info.size} {info.dtype}, {info.params:,} params, "
        f"{format_bytes(info.weights_bytes)} in {info.shards} shard{'s' if info.shards != 1 else ''}, "
        f"{info.seconds:.1f} s"
    )


def _encoder(
    path: Path,
    arch: str,
    task: str | None,
    size: str,
    labels: str | None,
    pooling: str,
    normalize: bool,
    matryoshka: str | None,
    dtype: str | None,
    seed: int,
    force: bool,
    fmt: str,
) -> None:
    if fmt != "safetensors" or dtype not in (None, "float32"):
        raise click.ClickException("the demo encoders are float32 safetensors only; drop --format and --dtype")
    try:
        sizes = tuple(int(d) for d in matryoshka.split(",")) if matryoshka else ()
    except ValueError as exc:
        raise click.ClickException(f"--matryoshka takes sizes like 16,32, got {matryoshka!r}") from exc
    info = write_demo_encoder(
        path,
        arch=arch,
        task=task or "embed",
        size=size,
        labels=labels.split(",") if labels is not None else None,
        pooling=pooling,
        normalize=normalize,
        matryoshka=sizes,
        seed=seed,
        force=force,
    )
    what = (
        f"labels {','.join(info.labels)}"
        if info.task == "classify"
        else f"{info.pooling} pooling" + (", normalized" if info.normalize else "")
    )
    click.echo(
        f"wrote {info.path}: {info.arch} {info.size} {info.task} encoder ({what}), {info.params:,} params, "
        f"{format_bytes(info.weights_bytes)}, {info.seconds:.1f} s"
    )
