"""How the demo builders write a checkpoint: refuse a folder that holds something unless forced, build beside it,
move in at the end, so an interrupted build never looks complete; and one seed per tensor, by its name.

Shared by ``demo.py`` (decoders), ``demo_encoder.py`` and ``demo_vision.py``.
"""

from __future__ import annotations

import shutil
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memserve.errors import InvalidArgument

__all__ = ["check_target", "replace_with", "staging_beside", "tensor_seed"]


def check_target(path: Path, *, force: bool, replaces: str = "replace it") -> None:
    """InvalidArgument unless ``path`` is new, an empty folder, or a folder ``force`` lets the build ``replaces``."""
    if path.exists() and not path.is_dir():
        raise InvalidArgument(f"{path} exists and is not a directory; choose a directory path", param="path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InvalidArgument(
            f"{path} is not empty; choose an empty or new directory, or pass --force (force=True) to {replaces}",
            param="path",
        )


@contextmanager
def staging_beside(path: Path) -> Iterator[Path]:
    """A new folder beside ``path`` to build in (its parent made if missing); removed on the way out, whatever
    happened (a build moved into place has taken it already)."""
    target = path.absolute()  # so that "." has a parent and a name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not mkdtemp: that makes it 0700, and it becomes the checkpoint's folder
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_with(staging: Path, path: Path) -> None:
    """``path`` becomes ``staging``, whole (what was there is removed first)."""
    target = path.absolute()
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one named tensor: the same name and seed give the same values in every build."""
    return seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))
