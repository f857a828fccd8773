"""HotRoutes: a runner's generation POSTs skip FastAPI's middleware and still answer as the app would."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from memserve.errors import InvalidArgument
from memserve.wire.http import HotRoutes, install_error_handlers, runner_json


def app_and_hot() -> tuple[FastAPI, HotRoutes, list[str]]:
    app = FastAPI()
    install_error_handlers(app, serves="this test app serves POST /echo")
    seen: list[str] = []

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await runner_json(request, 1024)
        seen.append(str(request.scope.get("route", "hot")))
        if body.get("fail") == "bad":
            raise InvalidArgument("the input is bad; send a good one", param="fail")
        if body.get("fail") == "bug":
            raise RuntimeError("a bug")
        return JSONResponse({"echo": body})

    return app, HotRoutes(app, {"/echo": echo}), seen


def call(asgi: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_hot_posts_answer_as_the_fastapi_app_does() -> None:
    app, hot, seen = app_and_hot()
    for body in ({"x": 1}, {"fail": "bad"}, {"fail": "bug"}):
        through_app, through_hot = call(app, "POST", "/echo", json=body), call(hot, "POST", "/echo", json=body)
        assert (through_hot.status_code, through_hot.json()) == (through_app.status_code, through_app.json())
    assert call(hot, "POST", "/echo", json={"fail": "bad"}).json()["error"]["param"] == "fail"
    assert call(hot, "POST", "/echo", json={"fail": "bug"}).status_code == 500
    wrong_type = call(hot, "POST", "/echo", content=b"{}", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 400 and "Content-Type: application/json" in wrong_type.text
    assert "hot" in seen and any(s != "hot" for s in seen)  # both ways ran the same handler


def test_everything_else_goes_to_the_app() -> None:
    _, hot, _ = app_and_hot()
    assert call(hot, "GET", "/echo").status_code == 405  # not a POST: FastAPI answers
    missing = call(hot, "POST", "/nothing", json={})
    assert missing.status_code == 404 and "this test app serves POST /echo" in missing.text
