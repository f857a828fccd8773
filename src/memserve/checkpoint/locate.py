"""Where a model is: a local folder, an id in the local Hugging Face cache, or a hub id.

Order: an existing path wins. A source that *looks like a path* and does not exist is answered at once
("no such folder", with the nearest existing name) and never goes to the hub: one that starts with ``.``,
``/`` or ``~``, has no ``/`` or more than one (outside ``@revision``), ends with ``/``, or whose first
component exists here (``models/demo-tinyy`` when ``./models`` is a folder). Everything else of the form
``org/name[@revision]`` is a hub id: looked up in the local cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read at call time); then, unless offline
(``HF_HUB_OFFLINE=1``) or the hub does not answer one short request, the hub is asked for the config and
the safetensors headers only, so nothing large is downloaded and an unreachable hub costs one try, not a
storm of retries.

A GGUF model (llama.cpp's single-file format) is a ``.gguf`` file, or a folder or cached snapshot that holds
exactly one and no ``config.json`` (``find_gguf``); it is planned from its own header (``checkpoint/gguf.py``)
and served by llama.cpp (``engines/llamacpp.py``).
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memserve.checkpoint.facts import (
    CheckpointFacts,
    check_adapters_on_base,
    facts_from_metadata,
    parse_config,
    read_adapter_facts,
    read_local_facts,
    with_adapters,
)
from memserve.checkpoint.gguf import (
    SPLIT_NAME,
    GgufFacts,
    is_gguf_adapter,
    read_gguf_adapters,
    read_gguf_facts,
)
from memserve.errors import CheckpointError, HubUnavailable, ModelNotFound

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HUB_PROBE_TIMEOUT_SECONDS = 3.0
"""The one short request that decides whether the hub is reachable before any lookup."""
_HUB_PROBE_KEPT_SECONDS = 30.0  # a burst of lookups makes one probe
_NEAREST_SCAN_ENTRIES = 10_000  # a huge folder is not read to its end for a suggestion


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


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` names a place on this machine rather than a hub id (see the module docstring)."""
    if spec.startswith((".", "/", "~")) or spec.endswith(("/", "\\")) or "\\" in spec:
        return True
    repo = spec.partition("@")[0]
    if repo.count("/") != 1:
        return True
    return Path(repo.partition("/")[0]).exists()


@dataclass(frozen=True)
class SourceCheck:
    """What ``serve`` says at start-up about one configured source. ``warning`` marks one that will fail
    until something changes (a hub id that is not cached while the hub is off)."""

    kind: Literal["dir", "hf-cache", "hub"]
    note: str
    warning: bool = False


def check_source(spec: str) -> SourceCheck:
    """Check a configured source without the network: a local folder or cached snapshot must be a readable
    checkpoint (ModelNotFound or CheckpointError otherwise); a hub id that is not cached is only reported."""
    source = locate(spec, lookup_hub=False)
    if source.path is not None:
        gguf = find_gguf(spec)
        if gguf is not None:  # llama.cpp's: its own header, read the same way
            read_gguf_facts(gguf, source=spec)
            return SourceCheck(source.kind, f"GGUF file {gguf}")
        read_local_facts(source.path, source=spec)  # headers only: a folder that is no checkpoint fails now
        where = "folder" if source.kind == "dir" else "in the local Hugging Face cache:"
        return SourceCheck(source.kind, f"{where} {source.path}")
    if hub_offline():
        return SourceCheck(
            "hub",
            f"not in the local Hugging Face cache ({hf_cache_dir()}) and HF_HUB_OFFLINE is "
            f"set: requests for it fail until it is downloaded (huggingface-cli download "
            f"{source.repo_id})",
            warning=True,
        )
    return SourceCheck("hub", "a hub id, not in the local cache: looked up on the hub on first use")


def locate(spec: str, *, lookup_hub: bool = True) -> ModelSource:
    """Resolve what the user typed to a source, or raise ModelNotFound / HubUnavailable saying where we looked.

    With ``lookup_hub=False`` a hub id that is not cached is returned as ``kind="hub"`` even when offline.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return ModelSource(spec=spec, kind="dir", path=path)
    if looks_like_path(spec):
        raise ModelNotFound(missing_path_message(spec))
    if not _REPO_ID.match(spec):
        raise ModelNotFound(
            f"{spec}: no such file or directory, and not a hub id (expected a model folder or org/name)"
        )
    repo_id, _, revision = spec.partition("@")
    cache = hf_cache_dir()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True)
        return ModelSource(
            spec=spec, kind="hf-cache", path=Path(str(snapshot)), repo_id=repo_id, revision=revision or None
        )
    except LocalEntryNotFoundError:
        pass
    if hub_offline() and lookup_hub:
        raise HubUnavailable(
            f"{spec}: not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
            f"download it first (huggingface-cli download {repo_id}) or pass a local folder{local_hint(spec)}"
        )
    return ModelSource(spec=spec, kind="hub", repo_id=repo_id, revision=revision or None)


def find_gguf(spec: str) -> Path | None:
    """The ``.gguf`` file ``spec`` names, or None when it is not a GGUF source; never reaches the hub.

    A GGUF source is a ``.gguf`` file, or a local folder or cached hub snapshot with no ``config.json`` that
    holds ``.gguf`` files: exactly one (or the splits of one model: its first file), else a CheckpointError listing
    them. A folder with a ``config.json`` is a
    transformers checkpoint even when a ``.gguf`` sits beside it. ModelNotFound as ``locate`` raises it.
    """
    source = locate(spec, lookup_hub=False)
    if source.path is None:
        return None
    path = source.path
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    firsts = [p for p in files if (m := SPLIT_NAME.match(p.name)) is not None and int(m["no"]) == 1]
    if len(firsts) == 1 and all(_split_of(p, firsts[0]) for p in files):
        return firsts[0]  # one model in splits: llama.cpp takes the first and reads the rest beside it
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise CheckpointError(
            f"{spec}: holds {len(files)} GGUF files ({names}); pass the one to serve, e.g. {path / files[0].name}"
        )
    return files[0] if files else None


def _split_of(path: Path, first: Path) -> bool:
    """Whether ``path`` is one of the splits of the model whose first file is ``first``."""
    mine, theirs = SPLIT_NAME.match(path.name), SPLIT_NAME.match(first.name)
    return (
        mine is not None and theirs is not None and (mine["stem"], mine["count"]) == (theirs["stem"], theirs["count"])
    )


def missing_path_message(spec: str) -> str:
    """ "no such folder", where the path stops existing, and the nearest existing name there."""
    path = Path(spec).expanduser()
    absolute = path if path.is_absolute() else Path.cwd() / path
    parts = absolute.parts
    found, depth = Path(parts[0]), 1
    while depth < len(parts) and (found / parts[depth]).exists():
        found, depth = found / parts[depth], depth + 1
    missing = parts[depth] if depth < len(parts) else absolute.name
    message = f"{spec}: no such folder (no such file or directory: {found / missing})"
    nearest = _nearest_name(found, missing)
    spec_parts = Path(spec).parts
    at = len(spec_parts) - (len(parts) - depth)  # the missing part's place in what the user wrote
    if nearest is not None and 0 <= at < len(spec_parts):
        message += f"; nearest existing name: {Path(*spec_parts[:at], nearest, *spec_parts[at + 1 :])}"
    reason = ""
    if spec.startswith((".", "/", "~")):
        pass
    elif len(spec_parts) > 1 and Path(spec_parts[0]).exists():
        reason = f"; it is read as a local path, never a hub id, because {spec_parts[0]!r} exists here"
    elif not _REPO_ID.match(spec):
        reason = "; and it is not a hub id (org/name)"
    size = path.name.removeprefix("demo-") if path.name.startswith("demo-") else None
    if size is not None and size in _demo_sizes():
        reason += f"; a demo model is made with: memserve demo-model {spec} --size {size}"
    return message + reason + ". Fix the path (relative paths start from the working directory)"


def _demo_sizes() -> tuple[str, ...]:
    from memserve.checkpoint.demo import SIZES

    return tuple(SIZES)


def local_hint(spec: str) -> str:
    """For a hub id that was not found: the local folder it may have meant (``modls/x`` for ``models/x``)."""
    first, _, rest = spec.partition("@")[0].partition("/")
    nearest = _nearest_name(Path.cwd(), first)
    return f" (no folder {first!r} here; nearest existing name: {nearest}/{rest})" if nearest else ""


def _nearest_name(folder: Path, name: str) -> str | None:
    try:
        with os.scandir(folder) as entries:
            names = [
                e.name
                for e in itertools.islice(entries, _NEAREST_SCAN_ENTRIES)
                if name.startswith(".") or not e.name.startswith(".")
            ]
    except OSError:
        return None
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return close[0] if close else None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


_probe_lock = threading.Lock()
_probe_result: tuple[float, str | None] | None = None  # (when, why unreachable or None)


def hub_unreachable_reason() -> str | None:
    """None when the hub answered one short request (any HTTP answer counts); else why not.

    The answer is kept for a short while, so a burst of lookups (or a retrying client) makes one try.
    """
    global _probe_result
    with _probe_lock:
        now = time.monotonic()
        if _probe_result is not None and now - _probe_result[0] < _HUB_PROBE_KEPT_SECONDS:
            return _probe_result[1]
        import httpx

        try:
            httpx.head(hub_endpoint(), timeout=HUB_PROBE_TIMEOUT_SECONDS)
            reason = None
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        _probe_result = (time.monotonic(), reason)
        return reason


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
    unreachable = hub_unreachable_reason()
    if unreachable is not None:
        raise HubUnavailable(
            f"{source.spec}: not in the local Hugging Face cache ({hf_cache_dir()}) and the hub at "
            f"{hub_endpoint()} could not be reached in one try of {HUB_PROBE_TIMEOUT_SECONDS:g} s ({unreachable}); "
            f"check the network, or set HF_HUB_OFFLINE=1 and pass a local folder{local_hint(source.spec)}"
        )
    try:
        config_path = hf_hub_download(source.repo_id, "config.json", revision=source.revision, cache_dir=hf_cache_dir())
        meta = get_safetensors_metadata(source.repo_id, revision=source.revision)
    except RepositoryNotFoundError as exc:
        raise ModelNotFound(
            f"{source.spec}: no such repository on the hub (or it is private){local_hint(source.spec)}"
        ) from exc
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


def with_adapter_sources(facts: CheckpointFacts | GgufFacts, sources: tuple[str, ...]) -> CheckpointFacts | GgufFacts:
    """The base's facts with its LoRA adapters on top, planned as one: PEFT folders on a safetensors checkpoint
    (memserve's runner), GGUF LoRA files on a GGUF model (llama-server's ``--lora``), each checked against the
    base as its runner would check it; an adapter of the other kind is an error that says what to pass."""
    paths = tuple(Path(s).expanduser() for s in sources)
    if isinstance(facts, GgufFacts):
        folder = next((p for p in paths if not is_gguf_adapter(p)), None)
        if folder is not None:
            raise CheckpointError(
                f"adapter {folder} is not a .gguf file, and {facts.source} is a GGUF model, which llama.cpp serves "
                "with GGUF LoRA adapters only: convert a PEFT adapter with llama.cpp's convert_lora_to_gguf.py "
                "(--base the model's safetensors folder)"
            )
        comma = next((p for p in paths if "," in str(p)), None)
        if comma is not None:  # llama-server takes its adapters as one comma-separated --lora list
            raise CheckpointError(f"adapter {comma}: llama-server cannot load a file whose path has a comma; rename it")
        return with_adapters(facts, read_gguf_adapters(paths, facts))
    gguf = next((p for p in paths if is_gguf_adapter(p)), None)
    if gguf is not None:
        raise CheckpointError(
            f"adapter {gguf} is a GGUF file, for a GGUF model served by llama.cpp; {facts.source} is served by "
            "memserve's runner, which takes PEFT adapter folders (adapter_config.json + adapter_model.safetensors)"
        )
    adapters = tuple(read_adapter_facts(p) for p in paths)
    base = Path(facts.source).expanduser()
    if base.is_dir():  # a local checkpoint: each adapter checked on its headers, whether or not a runner is up
        check_adapters_on_base(paths, base)
    return with_adapters(facts, adapters)
