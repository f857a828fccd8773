"""The states of a configured model, named once: the pool, the eviction policy, the CLI and the gateway read these.

``ModelState`` is a ``StrEnum``, so a state is its own JSON (``"ready"``) and compares equal to that string.
"""

from __future__ import annotations

from enum import StrEnum


class ModelState(StrEnum):
    """Where one model is in its lifecycle (see ``pool/pool.py`` for the transitions)."""

    STOPPED = "stopped"
    STARTING = "starting"  # planning, waiting for memory, or its runner process starting
    LOADING = "loading"  # resolving and mapping its weights
    WARMING = "warming"  # faulting weights in and running the warm-up forwards
    READY = "ready"
    DRAINING = "draining"  # finishing its requests before it stops
    FAILED = "failed"

    @property
    def loading(self) -> bool:
        """On its way to ready: the watchdog samples it more often, and it is never evicted to make room."""
        return self in LOADING_STATES


LOADING_STATES = frozenset({ModelState.STARTING, ModelState.LOADING, ModelState.WARMING})

__all__ = ["LOADING_STATES", "ModelState"]
