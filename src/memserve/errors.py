"""One error tree for memserve. Every class maps to an HTTP status and an OpenAI error ``type``.

::

    MemserveError                      500 api_error
    ├── InvalidArgument                400 invalid_request_error   bad flag, field or value
    ├── CheckpointError                400 invalid_request_error   not a model, corrupt header, bad config
    ├── ModelNotFound                  404 not_found_error         nothing at that path, cache or hub id
    └── HubUnavailable                 503 api_error               offline and the id is not cached

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
        return {
            "error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
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
