"""The LoRA adapters added at run time (``POST /api/adapters``), kept so that a restarted gateway serves them again.

Adapters listed in the config file are not stored: the file is their record. An adapter removed at run time is
deleted here, so a restart does not bring it back. Gateways sharing one Postgres share the list: each serves
what it finds when it starts (one added on another gateway meanwhile is served there, and here after a restart).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from memserve.store.faults import Target, translated
from memserve.store.schema import adapters

__all__ = ["AdapterStore", "StoredAdapter"]


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    model: str
    source: str
    created_at: datetime


class AdapterStore:
    def __init__(self, engine: AsyncEngine, target: Target, *, clock: Callable[[], datetime]) -> None:
        self._engine, self._target, self._clock = engine, target, clock

    async def put(self, name: str, model: str, source: str) -> None:
        """Record adapter ``name`` on ``model`` (replacing a record of the same name)."""
        with translated(self._target):
            async with self._engine.begin() as conn:
                await conn.execute(adapters.delete().where(adapters.c.name == name))
                await conn.execute(
                    adapters.insert().values(name=name, model=model, source=source, created_at=self._clock())
                )

    async def remove(self, name: str) -> None:
        with translated(self._target):
            async with self._engine.begin() as conn:
                await conn.execute(adapters.delete().where(adapters.c.name == name))

    async def list(self) -> list[StoredAdapter]:
        """Every stored adapter, oldest first."""
        with translated(self._target):
            async with self._engine.connect() as conn:
                rows = await conn.execute(sa.select(adapters).order_by(adapters.c.created_at, adapters.c.name))
                return [StoredAdapter(r.name, r.model, r.source, r.created_at) for r in rows]
