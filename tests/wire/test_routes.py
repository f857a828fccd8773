"""Each app serves exactly its route table (``memserve.wire.routes``), and its "no route" answer lists it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from memserve.gateway.app import create_app as create_gateway
from memserve.pool.pool import ModelPool
from memserve.runner.app import create_app as create_runner
from memserve.wire.fake import FakeOpenAI
from memserve.wire.routes import GATEWAY_ROUTES, OPENAI_ROUTES, RUNNER_ROUTES, Route, describe
from tests.gateway.test_gateway_process import GiB, host, settings_for
from tests.runner.fakes import FakeEngine


def served_routes(app: FastAPI) -> list[Route]:
    """The routes ``app`` answers, as the table spells them (FastAPI's own documentation routes left out)."""
    return sorted(
        (Route(method, route.path) for route in app.routes if isinstance(route, APIRoute) for method in route.methods),
        key=str,
    )


def table(routes: tuple[Route, ...]) -> list[Route]:
    assert len(set(routes)) == len(routes), "a route is declared twice"
    return sorted(routes, key=str)


@pytest.fixture
def runner(tiny_model_dir: Path) -> FastAPI:
    return create_runner(
        engine=FakeEngine([1, 2]),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        model_name="tiny",
        context_tokens=64,
        health=dict,
    )


@pytest.fixture
def gateway(tmp_path: Path) -> FastAPI:
    settings = settings_for(tmp_path, [])
    app = create_gateway(settings, ModelPool(settings, host(4 * GiB)))
    return app.app  # type: ignore[attr-defined, no-any-return]  # the FastAPI app behind the hot routes


def test_the_runner_serves_exactly_its_table(runner: FastAPI) -> None:
    assert served_routes(runner) == table(RUNNER_ROUTES)
    message = TestClient(runner).get("/v1/nothing").json()["error"]["message"]
    assert message == f"no route GET /v1/nothing; this runner serves {describe(RUNNER_ROUTES)}"


def test_the_gateway_serves_exactly_its_table(gateway: FastAPI) -> None:
    assert served_routes(gateway) == table(GATEWAY_ROUTES)
    message = TestClient(gateway).get("/v1/nothing").json()["error"]["message"]
    assert message == f"no route GET /v1/nothing; memserve serves {describe(GATEWAY_ROUTES)}"


def test_both_apps_and_the_fake_serve_the_openai_routes(tiny_model_dir: Path) -> None:
    assert set(OPENAI_ROUTES) <= set(RUNNER_ROUTES) and set(OPENAI_ROUTES) <= set(GATEWAY_ROUTES)
    with TestClient(FakeOpenAI()) as client:  # type: ignore[arg-type]
        assert client.get("/v1/models").status_code == 200
        for route in OPENAI_ROUTES:
            assert (
                client.request(route.method, route.path, json={"model": "fake-model", "prompt": "hi"}).status_code
                == httpx.codes.OK
            )
        assert client.get("/v1/nothing").status_code == 404


def test_describe_lists_routes_for_a_sentence() -> None:
    assert describe([Route("GET", "/a")]) == "GET /a"
    assert describe([Route("GET", "/a"), Route("POST", "/b"), Route("GET", "/c")]) == "GET /a, POST /b and GET /c"
