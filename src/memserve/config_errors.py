"""One readable line per settings error, naming the source that supplied the value.

pydantic reports a field path in its own names and words; the user wrote a key in a YAML file, an
environment variable or a flag, perhaps under an alias (``keep_alive`` for ``keep_alive_seconds``). This
module turns the first error into ``<source>: <path as written>: <what was wrong and what to do>``, with
``(and N more problems)``, and never echoes a secret. It knows nothing of memserve's settings: the
settings class, the file's data and the flags come in, so :mod:`memserve.config` imports it and not
the other way round. Like that module, it must never import torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

from pydantic import AliasChoices, BaseModel
from pydantic_core import ErrorDetails, PydanticCustomError

from memserve.wire.format import param_path

__all__ = ["FIELD_ERROR", "Origin", "field_error", "one_line", "problem"]

FIELD_ERROR = "memserve_config"
"""The error type of :func:`field_error`: its context carries the field path and the whole message."""
_SECRET_WORDS = ("key", "secret", "password")


def field_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field error that still names its field path (pydantic would put it on the whole model)."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"field": field, "message": message})


class Origin:
    """Says which source (flag, env var or file) supplied the top-level setting an error is about."""

    def __init__(
        self,
        settings_cls: type[BaseModel],
        path: Path | None,
        file_data: Mapping[str, Any],
        given: Mapping[str, Any],
        models_from: str = "",
    ) -> None:
        self.settings_cls, self.path, self.file_data, self.given = settings_cls, path, file_data, given
        self.models_from = models_from

    def describe(self, errors: list[ErrorDetails]) -> str:
        """The first error as one line that names its source and field path; the others only counted."""
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        first = errors[0]
        where, key = self.locate(first)
        return f"{where}: {_path(first, key)}: {problem(first, self.settings_cls)}{more}"

    def locate(self, error: ErrorDetails) -> tuple[str, str]:
        """The source of the setting the error is about, and its key there (``keep_alive``, not the field name)."""
        loc = _full_loc(error)
        if not loc:
            return "settings", ""
        key = str(loc[0])
        names = _names_of(self.settings_cls, key)
        if key == "models" and self.models_from:
            return self.models_from, key
        given = next((name for name in names if name in self.given), None)
        if given is not None:
            return "command line", given
        prefix = str(self.settings_cls.model_config.get("env_prefix", ""))
        env = _env_var_for(prefix, names)
        if env is not None:
            return f"environment variable {env}", env[len(prefix) :].split("__")[0].lower()
        in_file = next((name for name in names if name in self.file_data), None)
        if self.path is not None and in_file is not None:
            return str(self.path), in_file
        return "settings", key


def problem(error: ErrorDetails, model: type[BaseModel]) -> str:
    """What was wrong and what to do, without pydantic's boilerplate and never echoing a secret.

    ``model`` is the class the error's path starts from: an unknown key lists the keys known there."""
    kind, loc = error["type"], _full_loc(error)
    last = str(loc[-1]) if loc else ""
    ctx = error.get("ctx") or {}
    if kind == FIELD_ERROR:
        return str(ctx["message"])
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return f"is required; add {last}: to this entry"
    if kind == "extra_forbidden":
        if any(word in last.lower() for word in _SECRET_WORDS):
            return "secrets never go in the config; export the key and name the variable with api_key_env"
        return f"unknown setting; known settings here: {', '.join(_known_keys(model, loc[:-1]))}"
    message = error["msg"]
    shown = _shown_input(error["input"], last)
    return f"{message[:1].lower()}{message[1:]}{shown}"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, newlines included, as one space."""
    return " ".join(text.split())


def _aliases(model: type[BaseModel], name: str) -> list[str]:
    alias = model.model_fields[name].validation_alias
    return [str(a) for a in alias.choices] if isinstance(alias, AliasChoices) else []


def _names_of(settings_cls: type[BaseModel], key: str) -> list[str]:
    """The field name and every alias of the settings field that ``key`` (a name or alias) refers to."""
    for name in settings_cls.model_fields:
        names = [name, *_aliases(settings_cls, name)]
        if key in names:
            return names
    return [key]


def _env_var_for(prefix: str, names: list[str]) -> str | None:
    wanted = {(prefix + name).upper() for name in names}
    for env_name in os.environ:
        upper = env_name.upper()
        if upper in wanted or any(upper.startswith(w + "__") for w in wanted):
            return env_name
    return None


def _full_loc(error: ErrorDetails) -> tuple[int | str, ...]:
    loc = tuple(error["loc"])
    if error["type"] == FIELD_ERROR:
        field = str((error.get("ctx") or {})["field"])
        loc += tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\[\]]+", field) if p)
    return loc


def _path(error: ErrorDetails, top_key: str) -> str:
    """``models[1].keep_alive``: the loc as the user wrote it, with the top-level key from its source."""
    loc = _full_loc(error)
    return param_path((top_key, *loc[1:]) if loc and top_key else loc) or "(top level)"


def _shown_input(value: Any, field: str) -> str:
    if isinstance(value, (dict, list)) or any(word in field.lower() for word in _SECRET_WORDS):
        return ""
    text = repr(value)
    return f" (got {text[:60]}{'...' if len(text) > 60 else ''})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``PolicyConfig``, or ``ModelConfig`` of ``list[ModelConfig]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def _known_keys(model: type[BaseModel], parent: tuple[int | str, ...]) -> list[str]:
    """The keys a user may write at ``parent`` (each field under its last alias, the one the YAML uses)."""
    for part in parent:
        name = next((n for n in model.model_fields if isinstance(part, str) and part in (n, *_aliases(model, n))), None)
        nested = _model_in(model.model_fields[name].annotation) if name is not None else None
        if nested is not None:
            model = nested
    return [(_aliases(model, name) or [name])[-1] for name in model.model_fields]
