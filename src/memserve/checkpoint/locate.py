"""Where a model is: a local folder, an id in the local Hugging Face cache, or a hub id.

Order: an existing path wins; then ``org/name[@revision]`` is looked up in the local cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read at call time); then,
unless offline (``HF_HUB_OFFLINE=1``), the hub is asked for the config and the safetensors headers
only, so nothing large is downloaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memserve.checkpoint.facts import CheckpointFacts, facts_from_metadata, parse_config, read_local_facts
from memserve.errors import HubUnavailable, ModelNotFound

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``path`` for local folders and cached snapshots, ``repo_id`` for the hub."""

    spec: str
    kind: Literal["dir", "hf-cache", "hub"]
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None


def hf_cache_dir() -> Path:
    """The hub cache folder, from the environment as it is now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def locate(spec: str) -> ModelSource:
    """Resolve what the user typed to a source, or raise ModelNotFound / HubUnavailable saying where we looked."""
    path = Path(spec).expanduser()
    if path.exists():
        return ModelSource(spec=spec, kind="dir", path=path)
    if not _REPO_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelNotFound(
            f"{spec}: no such file or directory, and not a hub id (expected a model folder or org/name)"
        )
    repo_id, _, revision = spec.partition("@")
    cache = hf_cache_dir()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(
            repo_id, revision=revision or None, cache_dir=cache, local_files_only=True
        )
        return ModelSource(spec=spec, kind="hf-cache", path=Path(str(snapshot)), repo_id=repo_id,
                           revision=revision or None)
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise HubUnavailable(
            f"{spec}: not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
            f"download it first (huggingface-cli download {repo_id}) or pass a local folder"
        )
    return ModelSource(spec=spec, kind="hub", repo_id=repo_id, revision=revision or None)


def read_facts(spec: str) -> CheckpointFacts:
    """Facts for anything ``locate`` accepts."""
    source = locate(spec)
    if source.path is not None:
        return read_local_facts(source.path, source=spec)
    return _hub_facts(source)


def _hub_facts(source: ModelSource) -> CheckpointFacts:
    """config.json (a few KB) and the safetensors headers (range requests) from the hub."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        NotASafetensorsRepoError,
        RepositoryNotFoundError,
    )

    assert source.repo_id is not None
    try:
        config_path = hf_hub_download(
            source.repo_id, "config.json", revision=source.revision, cache_dir=hf_cache_dir()
        )
        meta = get_safetensors_metadata(source.repo_id, revision=source.revision)
    except RepositoryNotFoundError as exc:
        raise ModelNotFound(f"{source.spec}: no such repository on the hub (or it is private)") from exc
    except GatedRepoError as exc:
        raise ModelNotFound(
            f"{source.spec}: the repository is gated; accept its terms and log in (huggingface-cli login)"
        ) from exc
    except NotASafetensorsRepoError as exc:
        raise ModelNotFound(f"{source.spec}: the repository has no safetensors weights to price") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise HubUnavailable(
            f"{source.spec}: not in the local Hugging Face cache ({hf_cache_dir()}) and the hub could not be "
            f"reached ({type(exc).__name__}); check the network or set HF_HUB_OFFLINE=1 and pass a local folder"
        ) from exc
    config = parse_config(Path(str(config_path)).read_bytes(), source=source.spec)
    return facts_from_metadata(config, meta, source=source.spec)
