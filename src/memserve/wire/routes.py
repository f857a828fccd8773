"""Every route memserve serves, declared once: the apps register their handlers from these tables, their
"no route" errors list them, the fake OpenAI server answers the OpenAI ones, and the tests check that each
app serves exactly its table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ADAPTERS",
    "ADAPTER_ADD",
    "ADAPTER_REMOVE",
    "ADAPTER_ROUTES",
    "BATCH",
    "BATCHES",
    "BATCH_CANCEL",
    "BATCH_CREATE",
    "BATCH_ROUTES",
    "CHAT_COMPLETIONS",
    "CLASSIFY",
    "COMPLETIONS",
    "EMBEDDINGS",
    "ENCODER_ROUTES",
    "EVENTS",
    "EVENTS_STREAM",
    "FILE",
    "FILES",
    "FILE_CONTENT",
    "FILE_DELETE",
    "FILE_UPLOAD",
    "FIT",
    "GATEWAY_ROUTES",
    "HEALTH",
    "KEY",
    "KEYS",
    "KEY_CREATE",
    "KEY_REVOKE",
    "KEY_ROUTES",
    "KEY_UPDATE",
    "LIVE_ROUTES",
    "LOAD",
    "MEMORY",
    "METRICS",
    "MODEL",
    "MODELS",
    "OPENAI_ROUTES",
    "PS",
    "RUNNER_ADAPTER_ADD",
    "RUNNER_ADAPTER_REMOVE",
    "RUNNER_ROUTES",
    "STATS",
    "UI",
    "UI_ROUTES",
    "UI_SCRIPT",
    "UI_STYLE",
    "UNLOAD",
    "USAGE",
    "Route",
    "describe",
]


@dataclass(frozen=True)
class Route:
    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


CHAT_COMPLETIONS = Route("POST", "/v1/chat/completions")
COMPLETIONS = Route("POST", "/v1/completions")
MODELS = Route("GET", "/v1/models")
HEALTH = Route("GET", "/health")
OPENAI_ROUTES = (CHAT_COMPLETIONS, COMPLETIONS, MODELS)
"""What an OpenAI-compatible server answers (the runner, the gateway, providers, the fake)."""

EMBEDDINGS = Route("POST", "/v1/embeddings")
CLASSIFY = Route("POST", "/v1/classify")
ENCODER_ROUTES = (EMBEDDINGS, CLASSIFY)
"""OpenAI's embeddings and vLLM's classify: what an encoder runner answers (``wire/encoders.py``)."""

STATS = Route("GET", "/stats")
RUNNER_ADAPTER_ADD = Route("POST", "/adapters")
RUNNER_ADAPTER_REMOVE = Route("DELETE", "/adapters/{name}")
RUNNER_ROUTES = (*OPENAI_ROUTES, HEALTH, STATS, RUNNER_ADAPTER_ADD, RUNNER_ADAPTER_REMOVE)
"""A runner's: OpenAI's, its health and figures, and the LoRA adapters on its base (``runner/lora.py``); the pool
calls the adapter routes for ``POST``/``DELETE /api/adapters``."""

PS = Route("GET", "/api/ps")
LOAD = Route("POST", "/api/load")
UNLOAD = Route("POST", "/api/unload")
FIT = Route("GET", "/api/fit")
MEMORY = Route("GET", "/api/memory")
EVENTS = Route("GET", "/api/events")
USAGE = Route("GET", "/api/usage")
METRICS = Route("GET", "/metrics")
KEYS = Route("GET", "/api/keys")
KEY_CREATE = Route("POST", "/api/keys")
KEY = Route("GET", "/api/keys/{name}")
KEY_UPDATE = Route("PATCH", "/api/keys/{name}")
KEY_REVOKE = Route("DELETE", "/api/keys/{name}")
KEY_ROUTES = (KEYS, KEY_CREATE, KEY, KEY_UPDATE, KEY_REVOKE)
ADAPTERS = Route("GET", "/api/adapters")
ADAPTER_ADD = Route("POST", "/api/adapters")
ADAPTER_REMOVE = Route("DELETE", "/api/adapters/{name}")
ADAPTER_ROUTES = (ADAPTERS, ADAPTER_ADD, ADAPTER_REMOVE)
"""LoRA adapters on loaded bases, added and removed without a reload (admin)."""
EVENTS_STREAM = Route("GET", "/api/events/stream")
UI = Route("GET", "/ui")
UI_SCRIPT = Route("GET", "/ui/app.js")
UI_STYLE = Route("GET", "/ui/style.css")
UI_ROUTES = (UI, UI_SCRIPT, UI_STYLE)
"""The live memory page's static files: public even with keys on (they hold no data)."""
LIVE_ROUTES = (EVENTS_STREAM, *UI_ROUTES)
"""What ``/ui`` adds: its files and the pool's events as SSE (``gateway/ui.py``)."""
FILE_UPLOAD = Route("POST", "/v1/files")
FILES = Route("GET", "/v1/files")
FILE = Route("GET", "/v1/files/{file_id}")
FILE_CONTENT = Route("GET", "/v1/files/{file_id}/content")
FILE_DELETE = Route("DELETE", "/v1/files/{file_id}")
BATCH_CREATE = Route("POST", "/v1/batches")
BATCHES = Route("GET", "/v1/batches")
BATCH = Route("GET", "/v1/batches/{batch_id}")
BATCH_CANCEL = Route("POST", "/v1/batches/{batch_id}/cancel")
BATCH_ROUTES = (FILE_UPLOAD, FILES, FILE, FILE_CONTENT, FILE_DELETE, BATCH_CREATE, BATCHES, BATCH, BATCH_CANCEL)
"""OpenAI's Files and Batch API on the gateway (``gateway/files.py``, ``gateway/batches.py``)."""
MODEL = Route("GET", "/v1/models/{model:path}")
"""OpenAI's "retrieve model": one entry of ``/v1/models`` (the gateway's; a runner serves one model); a path, as a
provider's models are ``provider/model``."""
GATEWAY_ROUTES = (
    *OPENAI_ROUTES,
    MODEL,
    *ENCODER_ROUTES,
    HEALTH,
    PS,
    LOAD,
    UNLOAD,
    FIT,
    MEMORY,
    EVENTS,
    USAGE,
    *KEY_ROUTES,
    *ADAPTER_ROUTES,
    METRICS,
    *LIVE_ROUTES,
    *BATCH_ROUTES,
)


def describe(routes: Sequence[Route]) -> str:
    """``POST /v1/chat/completions, GET /v1/models and GET /health``, for messages."""
    names = [str(route) for route in routes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
