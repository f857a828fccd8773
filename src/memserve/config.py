"""The gateway's settings: one pydantic-settings model, read from flags, ``MEMSERVE_*`` env and a YAML file.

Precedence, highest first: command-line flag > ``MEMSERVE_*`` environment variable > the YAML file
(``--config`` or ``MEMSERVE_CONFIG``; never picked up from the working directory by surprise) > default.
Sources merge per top-level setting: ``MEMSERVE_MODELS`` (JSON) replaces the file's whole model list, and
``--model NAME=SOURCE`` adds a model or replaces the file's model of that name.

Durations accept seconds or Ollama-style strings (``300ms``, ``30s``, ``5m``, ``1h30m``); ``keep_alive``
also takes ``-1`` (forever, stored as ``math.inf`` and shown as ``-1`` in JSON) and ``0`` (unload when
idle). Byte settings accept ``128MiB``-style sizes. Secrets never live here: a provider names the
environment variable that holds its key, and :meth:`ProviderConfig.api_key` reads it when called.

Every problem becomes one :class:`~memserve.errors.InvalidArgument` line that names where the value came
from, the field path (``models[1].keep_alive``) and what to write instead (:mod:`memserve.config_errors`).
The YAML file is parsed once, and its data is handed to pydantic-settings as a source of its own. This
module must never import torch: the gateway imports it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from pydantic_settings.sources import DefaultSettingsSource

from memserve.config_errors import Origin, field_error, one_line, problem
from memserve.errors import InvalidArgument
from memserve.units import parse_bytes, parse_device_sizes, parse_seconds
from memserve.wire.images import ImageLimits

__all__ = [
    "ModelConfig",
    "PolicyConfig",
    "ProviderConfig",
    "Settings",
    "default_data_dir",
    "load_settings",
]

ENV_PREFIX = "MEMSERVE_"
CONFIG_ENV = "MEMSERVE_CONFIG"
_MiB = 1024**2
_NAME = re.compile(r"^[^/\s]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---- value types: what a human writes → plain seconds and bytes -------------------------------------------


def _to_seconds(value: Any) -> float:
    try:
        return parse_seconds(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


def _to_bytes(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"cannot read size {value!r}: expected bytes or a size such as 128MiB, 16GiB or 20GB")
    try:
        return parse_bytes(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


def _finite(seconds: float) -> float:
    if math.isinf(seconds):
        raise ValueError("must be a finite duration here (-1 means forever only for keep_alive), e.g. 30s or 10m")
    return seconds


def _positive(number: float) -> float:
    if number <= 0:
        raise ValueError(f"must be greater than 0, got {number:g}")
    return number


def _forever_as_minus_one(seconds: float) -> float:
    """JSON has no infinity; -1 is how Ollama users write "forever", and it reads back the same."""
    return -1.0 if math.isinf(seconds) else seconds


KeepAliveSeconds = Annotated[
    float, BeforeValidator(_to_seconds), PlainSerializer(_forever_as_minus_one, when_used="json")
]
"""Seconds to keep an idle model loaded: 0 unloads when idle, ``math.inf`` (from -1) never."""
WaitSeconds = Annotated[float, BeforeValidator(_to_seconds), AfterValidator(_finite)]
"""A finite, non-negative wait (0 = do not wait)."""
IntervalSeconds = Annotated[float, BeforeValidator(_to_seconds), AfterValidator(_finite), AfterValidator(_positive)]
"""A finite, positive timeout or sampling interval."""
Bytes = Annotated[int, BeforeValidator(_to_bytes)]
"""A non-negative number of bytes; accepts ``128MiB``-style sizes."""


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"{what} name {name!r} must be non-empty without spaces or '/' (clients write provider/model for "
            "remote models), e.g. qwen-0.5b"
        )
    return name


# ---- the models ----------------------------------------------------------------------------------------------


class ImageCapsConfig(BaseModel):
    """Caps on the images of one request to a vision-language model (docs/images.md): the gateway's door refuses a
    request past them, the runner checks them again, and the plan prices this many images of this size."""

    model_config = ConfigDict(extra="forbid")

    max_images: int = Field(default=4, ge=1, description="Images in one request (vLLM's limit_mm_per_prompt).")
    max_image_bytes: Bytes = Field(default=10 * _MiB, description="Bytes of one image as sent (e.g. 10MiB).")
    max_image_pixels: int = Field(
        default=2048 * 2048,
        ge=1,
        description="Width × height of one image; the runner holds ~7 bytes a pixel for each while it resizes them.",
    )

    def limits(self, *, allow_urls: bool = False) -> ImageLimits:
        return ImageLimits(
            max_images=self.max_images,
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            allow_urls=allow_urls,
        )


class PolicyConfig(BaseModel):
    """Which rungs of the placement ladder this model may use, and how it may recover."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    allow_gpu: bool = Field(default=True, description="Allow placements on a GPU.")
    allow_split: bool = Field(default=True, description="Allow splitting the model between GPU and CPU memory.")
    allow_cpu: bool = Field(default=True, description="Allow running the model on the CPU.")
    quantization: Literal["auto", "none", "int8", "4bit"] = Field(
        default="auto",
        description="auto: try the checkpoint dtype, then int8, then 4-bit as the ladder needs; "
        "none: never quantize; int8 / 4bit: always load that way.",
    )
    min_context_tokens: int | None = Field(
        default=None,
        ge=1,
        validation_alias=AliasChoices("min_context_tokens", "min_context"),
        description="Allow the smaller-context rung to cut the context down to this many tokens "
        "(YAML key min_context). None: never plan less context than configured.",
    )
    retry_lower: bool = Field(
        default=True,
        description="After a second watchdog kill on one rung (the first is retried on that rung with "
        "what it was measured to use), prefer the rungs below it until the model is unloaded.",
    )


class AdapterConfig(BaseModel):
    """A LoRA adapter served on a local model's one copy of its weights (docs/adapters.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="The name clients send as \"model\" (or base:name); no '/' or ':', unique among all models."
    )
    source: str = Field(
        description="A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors); for a GGUF model "
        "(llama.cpp), a GGUF LoRA file (convert_lora_to_gguf.py)."
    )

    @field_validator("name")
    @classmethod
    def _name_has_no_separator(cls, name: str) -> str:
        if ":" in name:
            raise ValueError(f"adapter name {name!r} must not contain ':' (clients may write base:adapter)")
        return _check_name(name, "adapter")


class ModelConfig(BaseModel):
    """A local model the gateway may load: the name clients send, where its weights are, and its limits."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    name: str = Field(description="The name clients send as \"model\". No '/' (that is provider/model).")
    source: str = Field(
        description="Where the weights are: a local directory (relative to the working directory), "
        "a Hugging Face cache id or a hub id."
    )
    runner: Literal["auto", "transformers", "vllm", "llama.cpp"] = Field(
        default="auto",
        description="The engine that serves this model: auto (vLLM on a CUDA GPU where it is installed, else "
        "memserve's own transformers runner), transformers, vllm or llama.cpp (docs/engines.md).",
    )
    engine: Literal["continuous-batching", "generate"] = Field(
        default="continuous-batching",
        description="How the transformers runner generates: continuous batching (paged KV cache), or plain "
        "model.generate in static batches (the fallback; planned with its own, smaller, memory).",
    )
    context_tokens: int | None = Field(
        default=None,
        ge=1,
        validation_alias=AliasChoices("context_tokens", "context"),
        description="Context length in tokens (YAML key context). None: the model's limit capped at 4096.",
    )
    concurrency: int = Field(default=4, ge=1, description="How many requests the runner generates for at once.")
    keep_alive_seconds: KeepAliveSeconds | None = Field(
        default=None,
        validation_alias=AliasChoices("keep_alive_seconds", "keep_alive"),
        description='How long the model stays loaded when idle (YAML key keep_alive): 300, "5m", '
        "-1 (forever) or 0 (unload when idle). None: the server's keep_alive.",
    )
    pinned: bool = Field(default=False, description="Never evict this model to make room for another.")
    preload: bool = Field(default=False, description="Load this model when the server starts.")
    fallback: str | None = Field(
        default=None,
        description='A remote "provider/model" used when this model does not fit or its queue is full.',
    )
    max_queue: int | None = Field(
        default=None,
        ge=0,
        description="Requests allowed to wait beyond concurrency before 429. None: 4 × concurrency.",
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Which placements this model may use.")
    images: ImageCapsConfig = Field(
        default_factory=ImageCapsConfig,
        description="Caps on one request's images, for a vision-language model (the plan prices them).",
    )
    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="LoRA adapters served on this model's one copy of its weights; each is a model of its own "
        "in /v1/models (parent: this model).",
    )

    @field_validator("name")
    @classmethod
    def _name_has_no_slash(cls, name: str) -> str:
        return _check_name(name, "model")

    @field_validator("source")
    @classmethod
    def _source_not_blank(cls, source: str) -> str:
        if not source.strip():
            raise ValueError("source is empty; give a local directory, a Hugging Face cache id or a hub id")
        return source

    @model_validator(mode="after")
    def _min_context_within_context(self) -> ModelConfig:
        floor, context = self.policy.min_context_tokens, self.context_tokens
        if floor is not None and context is not None and floor > context:
            raise field_error(
                "policy.min_context",
                f"min_context {floor} is larger than context {context}; lower min_context or raise context",
            )
        return self


class ProviderConfig(BaseModel):
    """A remote OpenAI-compatible upstream; clients address its models as ``name/model``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Clients address this provider's models as name/model. No '/'.")
    base_url: str = Field(
        description="The OpenAI-compatible base URL, e.g. https://api.groq.com/openai/v1 (a trailing / is dropped)."
    )
    api_key_env: str | None = Field(
        default=None,
        description="The name of the environment variable that holds the API key (never the key itself).",
    )
    models: list[str] = Field(default_factory=list, description="Model ids this provider serves.")
    timeout_seconds: IntervalSeconds = Field(default=600.0, description="How long one upstream request may take.")
    stream_usage: bool = Field(
        default=True,
        description="Ask its streams for token counts (stream_options.include_usage) to meter them exactly; "
        "false for a provider that rejects the field (then a stream is metered by its text events).",
    )

    @field_validator("name")
    @classmethod
    def _name_has_no_slash(cls, name: str) -> str:
        return _check_name(name, "provider")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        url = url.strip()
        if not url.startswith(("http://", "https://")) or url in ("http://", "https://"):
            raise ValueError(f"{url!r} must start with http:// or https://, e.g. https://api.groq.com/openai/v1")
        return url.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_var_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME.match(name):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, _), e.g. GROQ_API_KEY, "
                "not the key itself; export the key under that name"
            )
        return name

    def api_key(self) -> str | None:
        """The key, read from the environment now, so a rotated key needs no restart; None if unset."""
        if self.api_key_env is None:
            return None
        return os.environ.get(self.api_key_env) or None


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/memserve``, or ``~/.local/share/memserve`` (XDG: ignore an empty or relative value)."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "memserve"


class Settings(BaseSettings):
    """Everything the gateway reads at start-up. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_prefix_target="all",
        env_nested_delimiter="__",
        env_ignore_empty=True,
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
    )

    host: str = Field(
        default="127.0.0.1", description="Address to listen on; 0.0.0.0 exposes the server to the network."
    )
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text: lines for a person; json: one object per line (time, level, logger, message and the "
        "request's or pool event's fields: model, key, status, tokens, ttft_seconds, duration_seconds ...).",
    )
    memory: str | None = Field(
        default=None,
        description="Memory budget per device, e.g. cpu=16GiB,cuda:0=20GiB. None: what each device really has.",
    )
    headroom: str | None = Field(
        default=None,
        description="Memory never handed out, per device (cpu=1GiB,cuda:0=512MiB) or one size for every device.",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where memserve keeps its state: $XDG_DATA_HOME/memserve or ~/.local/share/memserve.",
    )
    keep_alive_seconds: KeepAliveSeconds = Field(
        default=300.0,
        validation_alias=AliasChoices("keep_alive_seconds", "keep_alive"),
        description='How long an idle model stays loaded unless it sets its own (key keep_alive): 300, "5m", '
        "-1 (forever) or 0 (unload when idle).",
    )
    memory_wait_seconds: WaitSeconds = Field(
        default=30.0, description="How long a request waits for memory held by busy models before a 503."
    )
    load_timeout_seconds: IntervalSeconds = Field(default=600.0, description="How long one model load may take.")
    watchdog_tolerance: float = Field(
        default=0.10, ge=0, description="A runner may exceed its planned bytes by this fraction before it is killed ..."
    )
    watchdog_tolerance_min_bytes: Bytes = Field(
        default=128 * _MiB, description="... or by this many bytes (e.g. 128MiB), whichever is larger."
    )
    host_floor_bytes: Bytes = Field(
        default=256 * _MiB, description="Kill a runner when the host's available memory drops below this (e.g. 256MiB)."
    )
    watchdog_interval_seconds: IntervalSeconds = Field(
        default=0.5, description="How often the watchdog samples a ready runner's memory."
    )
    watchdog_loading_interval_seconds: IntervalSeconds = Field(
        default=0.05, description="How often the watchdog samples a loading runner's memory (loads grow fast)."
    )
    max_body_bytes: Bytes = Field(
        default=16 * _MiB, gt=0, description="Request bodies larger than this get 413 (e.g. 16MiB)."
    )
    request_timeout_seconds: IntervalSeconds = Field(
        default=600.0,
        validation_alias=AliasChoices("request_timeout_seconds", "request_timeout"),
        description='How long one generation request may run (e.g. "10m", key request_timeout) before it is '
        "stopped with a 504; a stream ends with an error event.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web page origins (e.g. http://localhost:3000, or * for any) allowed to call this server "
        "from a browser. Requests from other pages' origins get a 403.",
    )
    auth: Literal["off", "keys"] | None = Field(
        default=None,
        description="keys: every route but /health needs an API key (memserve keys create); off: anyone who "
        "can reach the server may use it. Default: off on a loopback address; any other address needs keys "
        "(or serve --insecure).",
    )
    database_url: str | None = Field(
        default=None,
        description="The store for keys and usage: sqlite:///path/memserve.db or postgresql://user@host/db "
        "(several gateways then share keys and usage). Default: SQLite in <data_dir>/memserve.db.",
    )
    metrics_public: bool = Field(
        default=False,
        description="With auth: keys, let GET /metrics answer without a key (for a Prometheus that cannot send one); "
        "its series name the keys and models.",
    )
    usage_flush_seconds: IntervalSeconds = Field(
        default=1.0, description="How often usage rows are written to the store (a kill -9 loses at most this much)."
    )
    image_urls: Literal["deny", "allow"] = Field(
        default="deny",
        description="allow: fetch http(s) image URLs in chat messages for local models; deny (default): only "
        "data: URLs, so the server is never a way into the network it sits in. Providers get URLs unchanged.",
    )
    models: list[ModelConfig] = Field(default_factory=list, description="Local models the gateway may load.")
    providers: list[ProviderConfig] = Field(
        default_factory=list, description="Remote OpenAI-compatible providers, addressed as provider/model."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Built directly (``Settings(port=1)``): flags (init kwargs) > env; no .env, no secrets dir.

        :func:`load_settings` adds the YAML file's data below these (:func:`_build`)."""
        return init_settings, env_settings

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_off_unquoted(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted ``auth: off`` as false (the README writes it so): that is "off". An
        unquoted ``on``/``yes``/``true`` is left to fail: it does not say whether keys were meant."""
        return "off" if value is False else value

    @field_validator("memory", "headroom", mode="before")
    @classmethod
    def _size_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("memory")
    @classmethod
    def _memory_names_devices(cls, text: str | None) -> str | None:
        if text is not None:
            sizes = _device_sizes(text, "memory")
            if "*" in sizes:
                raise ValueError(f"{text!r} does not name a device; write e.g. cpu=16GiB or cpu=16GiB,cuda:0=20GiB")
        return text

    @field_validator("headroom")
    @classmethod
    def _headroom_sizes(cls, text: str | None) -> str | None:
        if text is not None:
            _device_sizes(text, "headroom")
        return text

    @field_validator("data_dir")
    @classmethod
    def _expand_home(cls, path: Path) -> Path:
        return path.expanduser()

    @model_validator(mode="after")
    def _names_and_references(self) -> Settings:
        _check_unique([m.name for m in self.models], "models", "model")
        _check_adapter_names(self.models)
        _check_unique([p.name for p in self.providers], "providers", "provider")
        provider_names = {p.name for p in self.providers}
        for index, model in enumerate(self.models):
            if model.name in provider_names:
                raise field_error(
                    f"models[{index}].name",
                    f"model name {model.name!r} is also a provider's name; rename one of them",
                )
            if model.fallback is not None:
                _check_fallback(model.fallback, f"models[{index}].fallback", provider_names)
        return self

    def model(self, name: str) -> ModelConfig | None:
        """The local model clients call ``name``, or None."""
        return next((m for m in self.models if m.name == name), None)

    def adapter(self, name: str) -> tuple[ModelConfig, AdapterConfig] | None:
        """The configured adapter clients call ``name`` or ``base:name``, with its base model; or None."""
        base_name, colon, adapter_name = name.partition(":")
        for model in self.models:
            if colon and model.name != base_name:
                continue
            for adapter in model.adapters:
                if adapter.name == (adapter_name if colon else name):
                    return model, adapter
        return None

    def provider(self, name: str) -> ProviderConfig | None:
        """The provider named ``name``, or None."""
        return next((p for p in self.providers if p.name == name), None)


def _device_sizes(text: str, what: str) -> dict[str, int]:
    try:
        return parse_device_sizes(text, what=what)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


def _check_adapter_names(models: list[ModelConfig]) -> None:
    """An adapter's name is a model name for clients: unique among every model and adapter."""
    seen = {m.name: f"models[{i}]" for i, m in enumerate(models)}
    for i, model in enumerate(models):
        for j, adapter in enumerate(model.adapters):
            where = f"models[{i}].adapters[{j}]"
            if adapter.name in seen:
                raise field_error(
                    f"{where}.name",
                    f"adapter name {adapter.name!r} is already used by {seen[adapter.name]}; clients name an "
                    "adapter like a model, so give it a name of its own",
                )
            seen[adapter.name] = where


def _check_unique(names: list[str], field: str, what: str) -> None:
    first_index: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first_index:
            raise field_error(
                f"{field}[{index}].name",
                f"{what} name {name!r} is already used by {field}[{first_index[name]}]; give each {what} its own name",
            )
        first_index[name] = index


def _check_fallback(fallback: str, field: str, provider_names: set[str]) -> None:
    provider, slash, model = fallback.partition("/")
    if not slash or not provider or not model:
        raise field_error(field, f"{fallback!r} must be provider/model, e.g. groq/llama-3.1-8b-instant")
    if provider not in provider_names:
        known = ", ".join(sorted(provider_names)) or "none are configured"
        raise field_error(
            field, f"provider {provider!r} is not configured (providers: {known}); add it under providers"
        )


# ---- loading --------------------------------------------------------------------------------------------------


def load_settings(config_file: Path | None = None, *, model_flags: Sequence[str] = (), **flags: Any) -> Settings:
    """Read the settings: flags > ``MEMSERVE_*`` env > YAML file > defaults. Raises InvalidArgument (one line).

    ``config_file`` None falls back to ``$MEMSERVE_CONFIG``, then to no file. ``model_flags`` are
    ``NAME=SOURCE`` strings: each adds a model or replaces the file's model of that name outright.
    Flags whose value is None were not given, so env and file still apply to them.
    """
    flag_models = _parse_model_flags(model_flags)
    path = _config_path(config_file)
    file_data = _read_yaml(path) if path is not None else {}
    given = {key: value for key, value in flags.items() if value is not None}
    settings = _build(file_data, given, Origin(Settings, path, file_data, given))
    if not flag_models:
        return settings
    models = _with_flag_models(settings.models, flag_models)
    origin = Origin(Settings, path, file_data, given, models_from="--model")
    return _build(file_data, {**given, "models": models}, origin)


def _with_flag_models(models: list[ModelConfig], flag_models: list[ModelConfig]) -> list[ModelConfig]:
    """A flag model takes the place of the configured model of its name (keeping none of its settings)."""
    by_name = {m.name: m for m in flag_models}
    merged = [by_name.pop(m.name, m) for m in models]
    return merged + list(by_name.values())


def _config_path(config_file: Path | None) -> Path | None:
    named_by = "--config"
    if config_file is None:
        env_value = os.environ.get(CONFIG_ENV, "")
        if not env_value:
            return None
        config_file, named_by = Path(env_value), CONFIG_ENV
    path = Path(config_file).expanduser()
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise InvalidArgument(f"config file {str(path)!r} (from {named_by}) {problem}; check the path", param="config")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    """Parse the file once up front, so a YAML mistake is reported with its line instead of a traceback."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidArgument(f"{where}: not valid YAML ({problem}); fix the indentation or quoting there") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read config file {str(path)!r}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(
            f"{path}: expected a mapping of settings at the top level (host:, port:, models:, ...), "
            f"got a {type(data).__name__}"
        )
    return data


def _parse_model_flags(model_flags: Sequence[str]) -> list[ModelConfig]:
    models: dict[str, ModelConfig] = {}
    for flag in model_flags:
        name, eq, source = flag.partition("=")
        name, source = name.strip(), source.strip()
        if not eq or not name or not source:
            raise InvalidArgument(f"--model {flag!r}: expected NAME=SOURCE, e.g. demo=models/demo-tiny", param="model")
        if name in models:
            raise InvalidArgument(f"--model {name!r} is given twice; give each model once", param="model")
        try:
            models[name] = ModelConfig(name=name, source=source)
        except ValidationError as exc:
            raise InvalidArgument(f"--model {flag!r}: {problem(exc.errors()[0], ModelConfig)}", param="model") from None
    return list(models.values())


def _build(file_data: dict[str, Any], init: dict[str, Any], origin: Origin) -> Settings:
    """Settings from flags (``init``) > env > the file's data > defaults, or one InvalidArgument line.

    The file was parsed once by :func:`_read_yaml`; its data is a source of its own here (what pydantic-settings'
    YAML source would make of the file), so nothing reads the file again. The sources are passed per call
    (``_build_sources``) because ``settings_customise_sources`` is a classmethod that sees no call's data."""
    sources = (
        InitSettingsSource(Settings, init_kwargs=init),
        EnvSettingsSource(Settings),
        InitSettingsSource(Settings, init_kwargs=file_data),
        DefaultSettingsSource(Settings),
    )
    try:
        # mypy types Settings(...) by its fields (pydantic's dataclass_transform), not BaseSettings.__init__
        return Settings(_build_sources=(sources, init))  # type: ignore[call-arg]
    except ValidationError as exc:
        raise InvalidArgument(origin.describe(exc.errors())) from None
    except SettingsError as exc:
        raise InvalidArgument(f"{one_line(str(exc))}; MEMSERVE_MODELS and MEMSERVE_PROVIDERS take JSON") from None
