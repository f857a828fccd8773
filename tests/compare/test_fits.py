"""When the next model's plan fits in the memory free now, the current one stays loaded; else it is unloaded."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from memserve.compare.run import fits_beside

MiB = 1 << 20


def answer(status: int, body: Any) -> bool:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/fit" and request.url.params["model"] == "next"
        return httpx.Response(status, json=body)

    async def go() -> bool:
        async with httpx.AsyncClient(base_url="http://gw", transport=httpx.MockTransport(handler)) as api:
            return await fits_beside(api, "next")

    return asyncio.run(go())


def fit(need: dict[str, int], free: dict[str, int]) -> dict[str, Any]:
    return {"plan": {"devices": {d: {"total_bytes": n} for d, n in need.items()}}, "free_now": free}


@pytest.mark.parametrize(
    ("status", "body", "fits"),
    [
        (200, fit({"cpu": 400 * MiB}, {"cpu": 500 * MiB}), True),
        (200, fit({"cpu": 400 * MiB}, {"cpu": 300 * MiB}), False),
        (200, fit({"cpu": 1, "cuda:0": 400 * MiB}, {"cpu": 500 * MiB, "cuda:0": 100 * MiB}), False),
        (200, fit({"cuda:0": 1}, {"cpu": 500 * MiB}), False),  # a device with nothing free
        (200, {"plan": None, "nofit": {"why": "too big"}, "free_now": {"cpu": 0}}, False),  # no plan: make room
        (404, {"error": {"message": "not configured"}}, False),
    ],
)
def testfits_beside(status: int, body: Any, fits: bool) -> None:
    assert answer(status, body) is fits
