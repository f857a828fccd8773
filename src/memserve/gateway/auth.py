"""Who is calling: the API key of a request, and what it may do.

With ``auth: keys`` every route but ``/health`` needs a key (``/metrics`` too unless it is made public):
``/v1/*`` a key allowed for the model asked for, ``/api/*`` and the API's own documents an admin key. Keys
come from ``Authorization: Bearer …`` (what the openai client sends) or ``x-api-key``. A key is checked
against the store (``KeyStore.verify``: hashed at rest, constant-time, cached for a few seconds); the
bootstrap admin key, from ``MEMSERVE_ADMIN_KEY`` only (never from the YAML file), is compared in constant
time without the store, so a fresh server can create its first keys.

With ``auth: off`` every caller is anonymous and may do everything: the default only on a loopback
address (``memserve serve`` refuses a network address without keys unless ``--insecure``).

The end user a backend serves is named by the OpenAI ``user`` field or the ``x-memserve-user`` header; it
is recorded with the usage, never used to authorise.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from memserve.errors import InvalidApiKey, InvalidArgument, PermissionDenied
from memserve.net import is_loopback
from memserve.wire.routes import UI_ROUTES

if TYPE_CHECKING:
    from memserve.store.keys import ApiKey, KeyStore

AuthMode = Literal["off", "keys"]
ADMIN_KEY_ENV = "MEMSERVE_ADMIN_KEY"
USER_HEADER = "x-memserve-user"
PUBLIC_PATHS = frozenset({"/health", *(route.path for route in UI_ROUTES)})
"""Routes that answer without a key (``/metrics`` joins them with ``metrics_public``); the ``/ui`` page's files
hold no data: the page asks for the admin key before it reads any."""
MODEL_PATHS_PREFIX = "/v1/"
"""Routes any valid key may call; the handler checks the key's models."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its key (None when auth is off, or for the bootstrap admin key)."""

    key: ApiKey | None = None
    admin: bool = False
    name: str | None = None  # the key's name, for logs and usage; "admin (MEMSERVE_ADMIN_KEY)" for the bootstrap

    def allows(self, model: str) -> bool:
        return self.key is None or self.key.allows(model)

    def check_model(self, model: str) -> None:
        """PermissionDenied (403) when the key may not use ``model``."""
        if not self.allows(model):
            allowed = ", ".join(self.key.models or ()) if self.key is not None else ""
            raise PermissionDenied(
                f"key {self.name!r} may not use model {model!r} (it may use: {allowed or 'nothing'}); ask an admin "
                "to add it (memserve keys update NAME --models ...), or use a key that has it",
                param="model",
            )


ANONYMOUS = Caller(admin=True)
"""Every caller when auth is off: no key, allowed everything."""


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY``, else ``x-api-key``; None without one."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    header = headers.get("x-api-key")
    return header.strip() if header and header.strip() else None


class Auth:
    """Identifies callers and says what each path needs. ``keys`` is None when auth is off."""

    def __init__(
        self, keys: KeyStore | None, *, admin_key: str | None = None, public_paths: frozenset[str] = PUBLIC_PATHS
    ):
        self.keys = keys
        self.admin_key = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None
        self.public_paths = public_paths

    @property
    def on(self) -> bool:
        return self.keys is not None

    async def caller(self, path: str, headers: Mapping[str, str]) -> Caller | None:
        """The caller allowed on ``path``, None for a public path; InvalidApiKey (401) or PermissionDenied (403).

        ``/v1/*`` takes any valid key (the route checks its models); every other route needs an admin key.
        """
        if self.keys is None:
            return ANONYMOUS
        if path in self.public_paths:
            return None
        secret = presented_key(headers)
        if secret is None:
            raise InvalidApiKey(
                "this server needs an API key: send it as 'Authorization: Bearer ms-…' (the openai client's "
                "api_key) or 'x-api-key: ms-…'; an admin creates keys with 'memserve keys create NAME'"
            )
        if self.admin_key is not None and hmac.compare_digest(secret.encode(), self.admin_key.encode()):
            return Caller(admin=True, name=f"admin ({ADMIN_KEY_ENV})")
        key = await self.keys.verify(secret)
        caller = Caller(key=key, admin=key.admin, name=key.name)
        if not path.startswith(MODEL_PATHS_PREFIX) and not caller.admin:
            raise PermissionDenied(
                f"{path} needs an admin key; key {key.name!r} is not one (memserve keys create NAME --admin)"
            )
        return caller


def auth_mode(configured: AuthMode | None, host: str, *, insecure: bool = False) -> AuthMode:
    """``keys`` or ``off`` for a server on ``host``: off by default only on a loopback address.

    A network address without keys is refused (InvalidArgument, saying both ways out) unless ``insecure``.
    """
    mode: AuthMode = configured or ("off" if is_loopback(host) else "keys")
    if mode == "off" and not is_loopback(host) and not insecure:
        raise InvalidArgument(
            f"refusing to serve {host} with auth off: anyone who can reach it could use every model and the "
            "management API. Turn keys on (auth: keys, and MEMSERVE_ADMIN_KEY or 'memserve keys create NAME "
            "--admin'), bind 127.0.0.1, or pass --insecure if a proxy in front authenticates",
            param="auth",
        )
    return mode


def end_user(body_user: object, headers: Mapping[str, str]) -> str | None:
    """The end user a request is made for: the OpenAI ``user`` field, else the ``x-memserve-user`` header."""
    if isinstance(body_user, str) and body_user:
        return body_user[:256]
    header = headers.get(USER_HEADER)
    return header[:256] if header else None


__all__ = ["ADMIN_KEY_ENV", "ANONYMOUS", "USER_HEADER", "Auth", "Caller", "auth_mode", "end_user", "presented_key"]
