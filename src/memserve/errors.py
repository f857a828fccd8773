"""One error tree for memserve. Every class maps to an HTTP status and an OpenAI error ``type``.

::

    MemserveError                      500 api_error
    ├── InvalidArgument                400 invalid_request_error   bad flag, field or value
    │   ├── ContextOverflow            400                         prompt longer than the planned context
    │   ├── UnsupportedParameter       400                         n > 1, tools, ...
    │   ├── RequestTooLarge            413                         a body past the server's max_body_bytes
    │   ├── BodyTooSlow                408                         a body that did not arrive in time (image runner)
    │   └── UnsupportedMediaType       415                         a JSON route sent something not JSON
    ├── OriginNotAllowed               403 permission_error        a browser page from an origin not in cors_origins
    ├── CheckpointError                400 invalid_request_error   not a model, corrupt header, bad config
    ├── ModelNotFound                  404 not_found_error         nothing at that path, cache or hub id
    ├── Overloaded                     429 rate_limit_error        a bounded queue is full (Retry-After)
    ├── GenerationFailed               500 api_error               the engine died or was closed mid-sequence
    ├── RunnerFailed                   502 api_error               a runner process exited or cannot start
    ├── UpstreamUnavailable            502 api_error               a provider or runner cannot be reached
    ├── BadUpstream                    502 api_error               an upstream answered something not OpenAI-shaped
    ├── HubUnavailable                 503 api_error               offline and the id is not cached
    ├── MemoryBusy                     503 api_error               fits, but memory did not free up in time
    ├── RequestTimedOut                504 api_error               past request_timeout; the generation was stopped
    └── InsufficientMemory             507 api_error               never fits here (the NoFit message)

Messages say what happened, what was expected, and what to do; the CLI prints them as one line
and exits non-zero, the server puts them in ``{"error": {"message", "type", "param", "code"}}``.
A plan that does not fit is *not* an exception: the planner returns a NoFit value.
"""

from __future__ import annotations

from typing import Any


class MemserveError(Exception):
    """Base of every error memserve raises on purpose."""

    status_code = 500
    error_type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: all four keys present, ``code`` a string or null."""
        return error_body(self.status_code, self.message, param=self.param, code=self.code, error_type=self.error_type)


_TYPES_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def error_type_for(status_code: int) -> str:
    """The OpenAI error ``type`` for an HTTP status: named 4xx types, else invalid_request_error; 5xx api_error."""
    if status_code >= 500:
        return "api_error"
    return _TYPES_BY_STATUS.get(status_code, "invalid_request_error")


def error_body(
    status_code: int, message: str, *, param: str | None = None, code: str | None = None, error_type: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``: the one place that builds the OpenAI error object
    (``MemserveError.to_openai`` included); ``error_type`` defaults to the status's."""
    return {
        "error": {"message": message, "type": error_type or error_type_for(status_code), "param": param, "code": code}
    }


class InvalidArgument(MemserveError):
    """A flag, request field or value is malformed or out of range."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_argument"


class CheckpointError(MemserveError):
    """A path exists but is not a usable checkpoint (no config, corrupt or truncated header, ...)."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_checkpoint"


def shown(text: str, limit: int = 120) -> str:
    """``repr(text)`` for a message, cut to ``limit`` characters and saying how long it was: a client's 1 MB model
    name is not echoed whole into the answer and the log."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


class ModelNotFound(MemserveError):
    """No model at the given path, in the local Hugging Face cache, or on the hub."""

    status_code = 404
    error_type = "not_found_error"
    code = "model_not_found"


class HubUnavailable(MemserveError):
    """The id is not in the local cache and the hub cannot be reached (or offline mode is on)."""

    status_code = 503
    error_type = "api_error"
    code = "hub_unavailable"


class ContextOverflow(InvalidArgument):
    """The prompt leaves no room for a completion in the context this runner was planned for."""

    code = "context_length_exceeded"


class UnsupportedParameter(InvalidArgument):
    """A request field that would change the answer is not implemented here (``n`` > 1, tools, ...)."""

    code = "unsupported_parameter"


class RequestTooLarge(InvalidArgument):
    """The request body is larger than the server accepts (``max_body_bytes``)."""

    status_code = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidArgument):
    """A JSON route got a body whose Content-Type is not JSON.

    Refused, not guessed: a web page may POST ``application/x-www-form-urlencoded`` or ``text/plain`` to
    any address without asking the browser's permission first (a "simple" request), so accepting those
    would let any page a local user opens drive a gateway on 127.0.0.1.
    """

    status_code = 415
    code = "unsupported_media_type"


class BodyTooSlow(InvalidArgument):
    """A request body that did not finish arriving in time, where a slow body would hold others up (an image
    runner reads one body at a time)."""

    status_code = 408
    code = "request_body_timeout"


class OriginNotAllowed(MemserveError):
    """A browser sent the request from a page whose origin is not in ``cors_origins``."""

    status_code = 403
    error_type = "permission_error"
    code = "origin_not_allowed"


class Overloaded(MemserveError):
    """A bounded queue is full; the client should retry after ``retry_after_seconds``."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_seconds: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_seconds = retry_after_seconds


class GenerationFailed(MemserveError):
    """The engine could not finish a sequence: its generation thread died, or the engine was closed."""

    status_code = 500
    error_type = "api_error"
    code = "generation_failed"


class RunnerFailed(MemserveError):
    """A runner process exited (signal, OOM kill, exception, watchdog) or could not start."""

    status_code = 502
    error_type = "api_error"
    code = "runner_failed"


class UpstreamUnavailable(MemserveError):
    """A remote provider or a runner cannot be reached (refused, timed out, DNS)."""

    status_code = 502
    error_type = "api_error"
    code = "upstream_unavailable"


class BadUpstream(MemserveError):
    """An upstream answered, but not with an OpenAI-shaped response (not JSON, not SSE)."""

    status_code = 502
    error_type = "api_error"
    code = "bad_upstream"


class InvalidApiKey(MemserveError):
    """No key, a key nobody issued, or one revoked or expired (401, as OpenAI answers a bad key)."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(MemserveError):
    """A valid key asked for what it may not use: a model not in its list, or an admin route (403)."""

    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class RateLimited(Overloaded):
    """A key went past one of its limits: ``code`` is ``rate_limit_exceeded`` (requests or tokens per minute)
    or ``insufficient_quota`` (daily or monthly tokens); ``Retry-After`` says when it resets."""

    code = "rate_limit_exceeded"


class StoreUnavailable(MemserveError):
    """The database cannot be opened or written: the message names it and what to do."""

    status_code = 503
    error_type = "api_error"
    code = "store_unavailable"


class Conflict(MemserveError):
    """The request contradicts what the server holds now: a name already taken, a model in the wrong state."""

    status_code = 409
    error_type = "conflict_error"
    code = "conflict"


class MemoryBusy(MemserveError):
    """The model fits on this host, but the memory it needs is held by busy models past the wait."""

    status_code = 503
    error_type = "api_error"
    code = "memory_busy"

    def __init__(self, message: str, *, retry_after_seconds: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class RequestTimedOut(MemserveError):
    """A request ran past ``request_timeout``; its generation was cancelled."""

    status_code = 504
    error_type = "api_error"
    code = "request_timeout"


EXIT_NO_FIT = 3
"""The exit status of a command that found no plan that fits (``fit``, ``run-model``, ``batch run --local``)."""


class InsufficientMemory(MemserveError):
    """The model cannot fit on this host with any allowed plan, even with every other model unloaded.

    507 (Insufficient Storage) rather than 503: retrying will not help until the budget or the
    request changes. The message is the planner's NoFit: needed and free bytes, and what would fit.
    """

    status_code = 507
    error_type = "api_error"
    code = "insufficient_memory"
