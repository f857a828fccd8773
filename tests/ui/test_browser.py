"""``/ui`` in a real browser: headless Chromium from Debian's ``chromium`` package, driven by Playwright (never a
downloaded browser), against a real gateway with real runners of the tiny demo models.

The page must render the models, show an eviction in its feed within a second of the pool's event, answer
"would it fit?", and with keys on show only the key prompt until an admin key is given. A screenshot of the
page is kept: under ``$MEMSERVE_ARTIFACTS`` when set, else in the test's temporary folder (its path is printed;
``pytest -s`` shows it). Without chromium the tests skip, naming the package; under ``CI=true`` they fail.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from memserve.config import ModelConfig
from tests.gateway.test_gateway_process import GiB, host, local, room_for_one, settings_for
from tests.ui.live import live_gateway, wait_for

ADMIN = "ms-admin-bootstrap-secret-for-ui-browser-tests"
LOAD_MS = 180_000  # a hang guard for one load of a tiny model on a busy machine, not a speed check


def chromium_path() -> str:
    """Debian's chromium; a skip naming the package without it (a failure under CI=true)."""
    path = shutil.which("chromium")
    missing = None if path else "chromium is not installed: apt-get install chromium (Debian's package)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed: pip install playwright (its browsers are not needed)"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the /ui browser tests need it under CI: {missing}")
        pytest.skip(missing)
    assert path is not None
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def tab(browser: Any, **options: Any) -> Iterator[Any]:
    """A page in a fresh browser context (its own sessionStorage), closed however the test ends: an open tab's
    event stream would hold the gateway's shutdown."""
    context = browser.new_context(**options)
    try:
        yield context.new_page()
    finally:
        context.close()


def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MEMSERVE_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def metrics_route(served_tokens: list[int]) -> Any:
    """A ``/metrics`` whose generation counter for ``demo`` grows by 40 at each scrape (the page's tokens/s
    reads it), so the test does not depend on what the real route exports today."""

    def fulfil(route: Any) -> None:
        served_tokens.append(served_tokens[-1] + 40 if served_tokens else 0)
        body = (
            "# TYPE memserve_generation_tokens_total counter\n"
            f'memserve_generation_tokens_total{{model="demo",provider="",key=""}} {served_tokens[-1]}\n'
        )
        route.fulfill(status=200, content_type="text/plain; version=1.0.0; charset=utf-8", body=body)

    return fulfil


def test_the_page_renders_the_models_and_shows_an_eviction_within_a_second(
    browser: Any, tmp_path: Path, tiny_model_dir: Path, tiny_qwen_dir: Path
) -> None:
    from playwright.sync_api import expect

    models = [local("demo", tiny_model_dir), local("qwen", tiny_qwen_dir)]
    settings = settings_for(tmp_path, models)
    with live_gateway(settings, host(room_for_one(tiny_model_dir, tiny_qwen_dir))) as live, ExitStack() as stack:
        page = stack.enter_context(tab(browser, viewport={"width": 1360, "height": 900}))
        page.route("**/metrics", metrics_route([]))
        page.goto(f"{live.origin}/ui")
        demo, qwen = page.locator('tr[data-model="demo"]'), page.locator('tr[data-model="qwen"]')
        expect(demo.locator('[data-cell="state"]')).to_have_text("stopped")
        expect(qwen.locator('[data-cell="state"]')).to_have_text("stopped")
        expect(page.locator("#login")).to_be_hidden()  # auth is off: no key asked for

        demo.get_by_role("button", name="Load", exact=True).click()
        expect(demo.locator('[data-cell="state"]')).to_have_text("ready", timeout=LOAD_MS)
        expect(page.locator('#feed li[data-event="ready"][data-model="demo"]')).to_have_count(1)
        for phase in ("map", "warm_up"):
            expect(page.locator('#feed li[data-event="phase"][data-model="demo"]', has_text=phase)).to_have_count(1)
        expect(page.locator('.device[data-device="cpu"] .segment[data-model="demo"]')).to_have_count(1)
        expect(demo.locator('[data-cell="rung"]')).to_have_text("cpu")
        expect(demo.locator('[data-cell="context"]')).to_have_text("256")
        expect(demo.locator('[data-cell="tps"]')).to_have_text(re.compile(r"^(?!0\.0$)\d+\.\d$"))  # from /metrics
        expect(qwen.locator('[data-cell="tps"]')).to_have_text("0.0")

        qwen.get_by_role("button", name="Load", exact=True).click()  # the budget holds one: demo is evicted for it
        evicted = page.locator('#feed li[data-event="evict"][data-model="demo"]')
        expect(evicted).to_have_count(1, timeout=LOAD_MS)
        pushed_ms = float(evicted.get_attribute("data-received") or 0) - 1000 * float(
            evicted.get_attribute("data-time") or 0
        )
        print(f"the eviction reached the page {pushed_ms:.0f} ms after the pool recorded it")
        assert pushed_ms < 1000, f"the eviction reached the page {pushed_ms:.0f} ms after the pool's event"
        expect(evicted).to_contain_text("to make room for qwen")
        expect(qwen.locator('[data-cell="state"]')).to_have_text("ready", timeout=LOAD_MS)
        expect(demo.locator('[data-cell="state"]')).to_have_text("stopped")
        expect(page.locator('.segment[data-model="demo"]')).to_have_count(0)

        page.locator("#fit-model").fill("demo")
        page.locator("#fit-context").fill("512")
        page.get_by_role("button", name="Check").click()
        expect(page.locator("#fit-answer")).to_contain_text("fits as cpu")
        expect(page.locator("#fit-answer")).to_contain_text("context 512")

        shot = artifacts(tmp_path) / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of /ui: {shot}")
        page.close()  # the tab's stream ends on the server
        wait_for(lambda: live.listeners() == 0, "the closed tab's event stream to end on the server")


def test_with_keys_on_the_page_asks_for_the_key_and_shows_nothing_without_it(
    browser: Any, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import expect

    monkeypatch.setenv("MEMSERVE_ADMIN_KEY", ADMIN)
    settings = settings_for(tmp_path, [ModelConfig(name="secret-model", source=str(tiny_model_dir))], auth="keys")
    with live_gateway(settings, host(4 * GiB)) as live, tab(browser) as page:
        answered: list[tuple[str, int]] = []
        page.on("response", lambda response: answered.append((response.url, response.status)))
        page.goto(f"{live.origin}/ui")
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#data")).to_be_hidden()
        assert "secret-model" not in page.content()
        data = [(url, status) for url, status in answered if "/ui" not in url]
        assert data and all(status == 401 for _, status in data), data  # asked, refused, shown nothing
        page.screenshot(path=str(artifacts(tmp_path) / "ui-login.png"))

        page.locator("#key").fill("ms-not-a-key-anybody-issued")
        page.get_by_role("button", name="Open").click()
        expect(page.locator("#login-message")).to_contain_text("key")
        expect(page.locator("#data")).to_be_hidden()
        assert "secret-model" not in page.content()

        page.locator("#key").fill(ADMIN)
        page.get_by_role("button", name="Open").click()
        expect(page.locator('tr[data-model="secret-model"] [data-cell="state"]')).to_have_text("stopped")
        expect(page.locator("#live")).to_have_text("live")
        assert page.evaluate("sessionStorage.getItem('memserve-admin-key')") == ADMIN
        page.screenshot(path=str(artifacts(tmp_path) / "ui-keys.png"))

        page.get_by_role("button", name="Forget key").click()
        expect(page.locator("#login")).to_be_visible()
        assert "secret-model" not in page.content()
        assert page.evaluate("sessionStorage.getItem('memserve-admin-key')") is None
        page.close()
        wait_for(lambda: live.listeners() == 0, "the closed tab's event stream to end on the server")
