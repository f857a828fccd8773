"""Engines: which servers can run a model here, besides memserve's own runner, and why one is not considered.

An engine is a runner kind (``memory/planner.py: RunnerKind``). ``transformers`` is memserve's own runner; the
others are external OpenAI-compatible servers the pool starts and supervises (``pool/external.py``), each with a
module here holding its pure functions: pricing its memory into rungs, and a plan → argv (``vllm.py``,
``llamacpp.py``). This module only says which exist and whether each can run (``engines_for``, what ``memserve
fit`` lists under its ladder), without importing any engine: finding vLLM costs one ``find_spec`` and a PATH
lookup, never an import of vLLM or torch.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memserve.errors import InvalidArgument

ENGINES = ("transformers", "vllm", "llama.cpp")
VLLM_COMMAND_ENV = "MEMSERVE_VLLM_COMMAND"
LLAMA_SERVER_COMMAND_ENV = "MEMSERVE_LLAMA_SERVER_COMMAND"
INSTALL = {
    "transformers": "pip install memserve",
    "vllm": "pip install 'memserve[vllm]' on a CUDA machine",
    "llama.cpp": "pip install 'memserve[llamacpp]', or put llama.cpp's llama-server on PATH",
}


@dataclass(frozen=True)
class EngineStatus:
    """One engine on this host for one model: whether it is installed, and whether (and why not) it is considered."""

    name: str
    installed: bool
    considered: bool
    why: str
    command: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "installed": self.installed,
            "considered": self.considered,
            "why": self.why,
            "command": list(self.command),
        }


def engine_command(name: str, environ: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """How an external engine is started: its environment variable's command (split like a shell), else its
    executable on PATH; None when neither names one. ``transformers`` is ``python -m memserve.runner``."""
    env = os.environ if environ is None else environ
    if name == "transformers":
        return ("python", "-m", "memserve.runner")
    variable, executable = {
        "vllm": (VLLM_COMMAND_ENV, "vllm"),
        "llama.cpp": (LLAMA_SERVER_COMMAND_ENV, "llama-server"),
    }[name]
    if env.get(variable):
        return tuple(shlex.split(env[variable]))
    found = shutil.which(executable)
    return (found,) if found else None


def is_installed(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``name`` can be started here: vLLM when its command is named or on PATH (or the package is importable
    and so will be on PATH in its environment), llama.cpp when llama-server is."""
    if name not in ENGINES:
        raise InvalidArgument(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}", param="engine")
    if engine_command(name, environ) is not None:
        return True
    return name == "vllm" and importlib.util.find_spec("vllm") is not None


def engines_for(
    *,
    has_gpu: bool,
    model_format: str,
    gguf: bool = False,
    environ: Mapping[str, str] | None = None,
) -> list[EngineStatus]:
    """Every engine, whether it is installed, and whether it is considered for a model of ``model_format`` (a
    GGUF file when ``gguf``) on a host with or without a CUDA GPU, with the reason in words."""
    statuses = [
        EngineStatus(
            "transformers",
            True,
            not gguf,
            "reads safetensors and .bin checkpoints, not GGUF files" if gguf else "memserve's own runner",
            engine_command("transformers", environ) or (),
        )
    ]
    for name, needs_gpu, reads_gguf in (("vllm", True, False), ("llama.cpp", False, True)):
        installed = is_installed(name, environ)
        why = ""
        if not installed:
            why = f"not installed: {INSTALL[name]}"
        elif needs_gpu and not has_gpu:
            why = "needs a CUDA GPU"
        elif reads_gguf and not gguf:
            why = "reads GGUF files only"
        elif not reads_gguf and gguf:
            why = f"reads safetensors checkpoints, not GGUF files ({model_format})"
        statuses.append(
            EngineStatus(name, installed, not why, why or "considered", engine_command(name, environ) or ())
        )
    return statuses


def require(name: str, environ: Mapping[str, str] | None = None) -> None:
    """Stop before anything is loaded when an engine asked for by name is not installed: the error names the
    install command."""
    if not is_installed(name, environ):
        raise InvalidArgument(
            f"the {name} engine was asked for but is not installed here: {INSTALL[name]}", param="runner"
        )


__all__ = [
    "ENGINES",
    "INSTALL",
    "LLAMA_SERVER_COMMAND_ENV",
    "VLLM_COMMAND_ENV",
    "EngineStatus",
    "engine_command",
    "engines_for",
    "is_installed",
    "require",
]
