"""LoRA adapters on one loaded base: every adapter's A and B beside the base weights, applied per token.

transformers' continuous batching packs every sequence of a step into one row of tokens, so PEFT's
per-sample ``adapter_names`` (one adapter per batch row) cannot say which adapter each token needs. Here
each targeted module of the base (a Linear, a quantized or packed Linear, GPT-2's Conv1D) is wrapped once
by :class:`LoraLinear`, which holds the A/B pair of every adapter that targets it; before each forward the
engine sets one adapter slot per token (continuous batching: from the batch's requests and their query
lengths) or per row (``generate``: one sequence per row) in the shared :class:`Routing`, and each wrapper
adds ``scale · (x Aᵀ) Bᵀ`` to the rows of each adapter present. A step with only base traffic costs one
``None`` check per wrapped module. The base weights are never changed (no merging), so the base and any
number of adapters are served by the same forward, and adding or removing an adapter swaps immutable
tuples the generation thread reads once per forward: no lock on the token path.

PEFT does the parts it owns: the adapter's config (``LoraConfig.from_pretrained``: rank and alpha
patterns, rsLoRA) and its key matching (``get_pattern_key``). What PEFT features change the answer beyond
A/B on Linear layers (DoRA, ``modules_to_save``, trained biases, embedding LoRA) is refused, naming the
feature, rather than served wrongly.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memserve.checkpoint.vision import language_model_regex
from memserve.errors import CheckpointError, InvalidArgument, ModelNotFound

__all__ = [
    "ADAPTER_WEIGHTS",
    "NO_ADAPTER",
    "AdapterInfo",
    "AdapterWeights",
    "LoraBank",
    "LoraLinear",
    "Routing",
    "read_adapter",
    "token_slots",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NO_ADAPTER = -1  # the slot of a token that only the base serves
_PREFIX = "base_model.model."  # PEFT saves every key under its wrapper's path


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter read from its folder: per module path, ``(A [r, in], B [out, r], scale)``."""

    name: str
    source: str
    base_model: str | None
    rank: int
    alpha: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) + int(b.nbytes) for a, b, _ in self.layers.values())


@dataclass(frozen=True)
class AdapterInfo:
    """What ``/v1/models`` and ``/health`` say about one loaded adapter."""

    name: str
    source: str
    base_model: str | None
    rank: int
    alpha: float
    modules: int
    weights_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "base_model": self.base_model,
            "rank": self.rank,
            "alpha": self.alpha,
            "modules": self.modules,
            "weights_bytes": self.weights_bytes,
        }


class Routing:
    """Which adapter slot each token of the current forward uses; set by the engine's thread before a forward.

    ``slots`` broadcasts against the activations' leading dims: ``[1, tokens]`` for continuous batching's
    packed row, ``[rows, 1]`` for ``generate``'s padded rows; None when every token is the base's. The rows of
    each adapter are found once per activation shape and shared by every wrapped layer of the forward.
    """

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self.present: tuple[int, ...] = ()
        self._rows: dict[tuple[tuple[int, ...], torch.device], tuple[bool, dict[int, torch.Tensor]]] = {}

    def set(self, slots: torch.Tensor | None) -> None:
        self._rows = {}
        if slots is None:
            self.slots, self.present = None, ()
            return
        present = tuple(int(s) for s in torch.unique(slots).tolist() if s != NO_ADAPTER)
        self.slots, self.present = (slots, present) if present else (None, ())

    def rows(self, leading: torch.Size, device: torch.device) -> tuple[bool, dict[int, torch.Tensor]]:
        """For activations whose leading dims are ``leading``, on ``device`` (a split plan's layers are on several):
        whether one adapter has every token, and the flat token indices of each adapter present."""
        key = (tuple(leading), device)
        found = self._rows.get(key)
        if found is None:
            assert self.slots is not None
            per_token = self.slots.to(device).expand(leading).reshape(-1)
            rows = {slot: (per_token == slot).nonzero().squeeze(1) for slot in self.present}
            uniform = len(self.present) == 1 and rows[self.present[0]].numel() == per_token.numel()
            found = self._rows[key] = (uniform, rows)
        return found


class LoraLinear(nn.Module):
    """A base module plus the LoRA pairs of every adapter that targets it, applied to each token's own adapter."""

    def __init__(self, base: nn.Module, routing: Routing, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.in_features, self.out_features = in_features, out_features
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # replaced whole, never mutated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        routing, pairs = self.routing, self.pairs  # each read once: the event loop may replace them meanwhile
        if routing.slots is None or not pairs:
            return y
        used = [s for s in routing.present if s in pairs]
        if not used:
            return y
        uniform, rows = routing.rows(x.shape[:-1], x.device)
        if uniform and len(used) == 1:
            a, b, scale = pairs[used[0]]
            return y + (x @ a.T) @ b.T * scale
        flat_x = x.reshape(-1, x.shape[-1])
        out = y.reshape(-1, y.shape[-1])  # y is the base's fresh output: added to in place, no copy
        for slot in used:
            a, b, scale = pairs[slot]
            index = rows[slot]
            if index.numel():
                out.index_add_(0, index, (flat_x.index_select(0, index) @ a.T) @ b.T, alpha=scale)
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={len(self.pairs)}"


def _dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a module LoRA can wrap: a Linear (plain, packed or quantized) or GPT-2's Conv1D."""
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if hasattr(module, "nf") and isinstance(weight, torch.Tensor):  # GPT-2's Conv1D: weight [in, out]
        nf: Any = module.nf
        return int(weight.shape[0]), int(nf)
    fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fan_in, int) and isinstance(fan_out, int):
        return fan_in, fan_out
    return None


def _lora_config(folder: Path, source: str) -> Any:
    from peft import LoraConfig

    try:
        raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"adapter {source}: no {ADAPTER_CONFIG}; expected a PEFT LoRA adapter folder (save_pretrained writes one)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"adapter {source}: {ADAPTER_CONFIG} cannot be read ({exc}); regenerate it") from exc
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"adapter {source}: is a {kind} adapter; memserve serves LoRA adapters only")
    try:
        return LoraConfig.from_pretrained(str(folder))
    except Exception as exc:  # PEFT's own validation of the config
        raise CheckpointError(f"adapter {source}: PEFT cannot read its {ADAPTER_CONFIG}: {exc}") from exc


def _refuse_unsupported(config: Any, source: str) -> None:
    reasons = []
    if getattr(config, "use_dora", False):
        reasons.append("DoRA (use_dora)")
    if getattr(config, "modules_to_save", None):
        reasons.append(f"modules_to_save {list(config.modules_to_save)} (full copies of base modules)")
    if getattr(config, "bias", "none") != "none":
        reasons.append(f"trained biases (bias={config.bias!r})")
    if reasons:
        raise CheckpointError(
            f"adapter {source} uses {', '.join(reasons)}, which memserve's shared-base LoRA does not apply; "
            "merge it into a full checkpoint (PEFT's merge_and_unload) and serve that as its own model"
        )


def read_adapter(name: str, source: str | Path, model: nn.Module, dtype: torch.dtype | None = None) -> AdapterWeights:
    """Read and check a PEFT LoRA folder against ``model``; every mismatch is a CheckpointError naming it.

    Checked: the folder has a LoRA config and ``adapter_model.safetensors``; each module the weights name
    exists in the base and is a Linear-like layer; A's rank equals B's and the config's (``r`` or its
    ``rank_pattern``); A's input and B's output sizes equal the base module's (an adapter trained on another
    base: both named); every ``target_modules`` entry matches a module of the base.
    """
    from peft.utils.other import get_pattern_key
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(source)
    source = str(source)
    if not folder.is_dir():
        raise ModelNotFound(f"adapter {name}: {source} is not a folder; pass the folder PEFT's save_pretrained wrote")
    config = _lora_config(folder, source)
    _refuse_unsupported(config, source)
    weights_file = folder / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(
            f"adapter {source} has no {ADAPTER_WEIGHTS} (found: {', '.join(found) or 'nothing'}); "
            "save the adapter with PEFT's save_pretrained (safetensors), or copy its weights file in"
        )
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"adapter {source}: {ADAPTER_WEIGHTS} cannot be read ({exc}); regenerate it") from exc
    base_name = getattr(config, "base_model_name_or_path", None)
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path = key.removeprefix(_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in path:
                module_path = path.split(marker)[0]
                pairs.setdefault(module_path, {})[part] = tensor
                break
        else:
            what = "embedding LoRA" if "lora_embedding" in path else "a tensor that is not a LoRA A or B"
            raise CheckpointError(
                f"adapter {source}: {key} is {what}, which memserve's shared-base LoRA does not apply; "
                "train the adapter on Linear layers only, or merge it and serve the merged model"
            )
    if not pairs:
        raise CheckpointError(f"adapter {source}: {ADAPTER_WEIGHTS} holds no LoRA weights; regenerate it")
    _check_targets(config, modules, source)
    target_dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    ranks: set[int] = set()
    for module_path, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise CheckpointError(f"adapter {source}: {module_path} has no {missing} weight; regenerate the adapter")
        module = modules.get(module_path)
        if module is None:
            raise CheckpointError(
                f"adapter {source} targets {module_path}, which does not exist in the base model "
                f"{_base_label(model)}; it was trained for another architecture "
                f"({base_name or 'its config names no base'}): load it on that base"
            )
        dims = _dims(module)
        if dims is None:
            raise CheckpointError(
                f"adapter {source} targets {module_path}, a {type(module).__name__} of the base, not a Linear layer; "
                "memserve applies LoRA to Linear layers only"
            )
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"adapter {source}: {module_path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                "whose ranks differ; the weights file is inconsistent, regenerate the adapter"
            )
        rank = int(a.shape[0])
        short = module_path
        expected_rank = int(config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), short), config.r))
        if rank != expected_rank:
            raise CheckpointError(
                f"adapter {source}: {module_path} has rank {rank} in its weights but rank {expected_rank} in "
                f"{ADAPTER_CONFIG}; the config and the weights belong to different adapters, regenerate it"
            )
        if (int(a.shape[1]), int(b.shape[0])) != dims:
            raise CheckpointError(
                f"adapter {source} was trained for another base ({base_name or 'its config names none'}): "
                f"{module_path} takes {a.shape[1]} inputs and gives {b.shape[0]} outputs in the adapter, "
                f"but {dims[0]} and {dims[1]} in this base ({_base_label(model)}); load it on its own base",
                code="adapter_base_mismatch",
            )
        alpha = float(config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), short), config.lora_alpha))
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        device = next(itertools.chain(module.parameters(), module.buffers()), a).device  # split plans: its own
        layers[module_path] = (
            a.to(device=device, dtype=target_dtype).contiguous(),
            b.to(device=device, dtype=target_dtype).contiguous(),
            scale,
        )
        ranks.add(rank)
    return AdapterWeights(
        name=name,
        source=source,
        base_model=base_name,
        rank=max(ranks),
        alpha=float(config.lora_alpha),
        layers=layers,
    )


def _check_targets(config: Any, modules: dict[str, nn.Module], source: str) -> None:
    """Every named target matches some module of the base (PEFT's own matching: a whole name part)."""
    from peft.utils.other import get_pattern_key

    targets = config.target_modules
    if not targets or isinstance(targets, str):  # a regex, or "all-linear": the weights say what they target
        return
    names = [path.removesuffix(".base") for path in modules]
    missing = [t for t in sorted(targets) if not any(get_pattern_key([t], n) == t for n in names)]
    if missing:
        raise CheckpointError(
            f"adapter {source} targets {', '.join(missing)}, which no module of the base model has; "
            "it was trained for another architecture: load it on its own base"
        )


def _base_label(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


@dataclass
class _Loaded:
    info: AdapterInfo
    slot: int
    modules: tuple[str, ...]
    in_flight: int = 0
    removed: bool = False


@dataclass
class LoraBank:
    """Every adapter on one base model: their slots, their wrapped modules, and their requests in flight.

    Named adapters are added and removed on the event loop; the generation thread reads only the
    wrappers' ``pairs`` and the routing. An adapter removed while requests use it stops taking new ones at
    once (:meth:`acquire` raises ModelNotFound) and its weights are dropped when the last one ends.
    """

    model: nn.Module
    # module paths (prefixes) adapters may target; () for all. A vision-language model's bank holds its language
    # model's (``language_model_scope``): the tower's batch is its images, not the rows the routing names
    scope: tuple[str, ...] = ()
    routing: Routing = field(default_factory=Routing)
    _loaded: dict[str, _Loaded] = field(default_factory=dict)
    _next_slot: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def names(self) -> list[str]:
        return [name for name, loaded in self._loaded.items() if not loaded.removed]

    def info(self) -> list[AdapterInfo]:
        return [loaded.info for loaded in self._loaded.values() if not loaded.removed]

    @property
    def weights_bytes(self) -> int:
        """Bytes of every adapter still held (removed ones with requests in flight included)."""
        return sum(loaded.info.weights_bytes for loaded in self._loaded.values())

    def add(self, name: str, source: str | Path) -> AdapterInfo:
        """Read, check and install one adapter; the base is not reloaded or changed."""
        if not name or ":" in name or "/" in name:
            raise InvalidArgument(
                f"adapter name {name!r} must be non-empty without ':' or '/' (requests name 'base:adapter')",
                param="name",
            )
        with self._lock:
            if name in self._loaded:
                state = "is being removed" if self._loaded[name].removed else "is already loaded"
                raise InvalidArgument(
                    f"adapter {name} {state} ({self._loaded[name].info.source}); remove it first or pick another name",
                    param="name",
                    code="adapter_exists",
                )
        weights = read_adapter(name, source, self.model)
        outside = [path for path in weights.layers if self.scope and not path.startswith(self.scope)]
        if outside:
            more = f" and {len(outside) - 1} more modules" if len(outside) > 1 else ""
            raise CheckpointError(
                f"adapter {weights.source} targets {outside[0]}{more}, outside this vision-language model's language "
                f"model ({', '.join(p.rstrip('.') for p in self.scope)}); memserve puts adapters on the language "
                "model only, as vLLM does: train it with target_modules limited to the language model (a regex such "
                f"as '{language_model_regex(self.scope, ('q_proj', 'v_proj'))}'), or merge it and serve the merged "
                "model"
            )
        with self._lock:
            if name in self._loaded:
                raise InvalidArgument(f"adapter {name} was added meanwhile; pick another name", code="adapter_exists")
            slot = self._next_slot
            self._next_slot += 1
            for path, (a, b, scale) in weights.layers.items():
                wrapper = self._wrapper(path)
                wrapper.pairs = {**wrapper.pairs, slot: (a, b, scale)}
            info = AdapterInfo(
                name=name,
                source=weights.source,
                base_model=weights.base_model,
                rank=weights.rank,
                alpha=weights.alpha,
                modules=len(weights.layers),
                weights_bytes=weights.nbytes,
            )
            self._loaded[name] = _Loaded(info, slot, tuple(weights.layers))
        return info

    def remove(self, name: str) -> AdapterInfo:
        """Stop new requests on ``name`` now; its weights go when its last request in flight ends."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is None or loaded.removed:
                raise ModelNotFound(
                    f"no adapter named {name} is loaded on this base; loaded: {', '.join(self.names()) or 'none'}",
                    param="name",
                )
            loaded.removed = True
            self._drop_if_idle(name, loaded)
            return loaded.info

    def acquire(self, name: str) -> int:
        """The slot for one new request on ``name``; ModelNotFound when no such adapter is loaded."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is None or loaded.removed:
                raise ModelNotFound(
                    f"no adapter named {name} is loaded on this base; loaded: {', '.join(self.names()) or 'none'}",
                    param="model",
                )
            loaded.in_flight += 1
            return loaded.slot

    def release(self, slot: int) -> None:
        """One request on ``slot`` ended."""
        with self._lock:
            for name, loaded in list(self._loaded.items()):
                if loaded.slot == slot:
                    loaded.in_flight -= 1
                    self._drop_if_idle(name, loaded)
                    return

    def _drop_if_idle(self, name: str, loaded: _Loaded) -> None:
        if not loaded.removed or loaded.in_flight > 0:
            return
        modules = dict(self.model.named_modules())
        for path in loaded.modules:
            wrapper = modules.get(path)
            if isinstance(wrapper, LoraLinear):
                wrapper.pairs = {s: p for s, p in wrapper.pairs.items() if s != loaded.slot}
        del self._loaded[name]

    def _wrapper(self, path: str) -> LoraLinear:
        module = self.model.get_submodule(path)
        if isinstance(module, LoraLinear):
            return module
        dims = _dims(module)
        assert dims is not None  # read_adapter checked it
        wrapper = LoraLinear(module, self.routing, *dims)
        parent_path, _, attr = path.rpartition(".")
        setattr(self.model.get_submodule(parent_path) if parent_path else self.model, attr, wrapper)
        return wrapper


def token_slots(
    counts: Sequence[int], slots: Iterable[int], total: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """The slot of every token of a packed row: ``counts[i]`` tokens of slot ``slots[i]``, then padding (the
    base's) up to ``total``; None when no token uses an adapter."""
    slot_list = list(slots)
    if all(s == NO_ADAPTER for s in slot_list):
        return None
    per_token = torch.repeat_interleave(
        torch.tensor(slot_list, dtype=torch.long), torch.tensor(list(counts), dtype=torch.long)
    )
    if per_token.numel() < total:
        per_token = torch.cat([per_token, torch.full((total - per_token.numel(),), NO_ADAPTER, dtype=torch.long)])
    return per_token[:total].unsqueeze(0).to(device or per_token.device)
