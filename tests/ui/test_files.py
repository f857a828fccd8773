"""The page's files: each is served by one declared route, and an installed package ships them all."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

from fastapi.testclient import TestClient

from memserve.gateway.app import create_app
from memserve.pool.pool import ModelPool
from memserve.wire.routes import UI, UI_ROUTES
from tests.gateway.test_gateway_process import GiB, host, settings_for

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "src" / "memserve" / "gateway" / "ui"


def test_every_file_of_the_page_is_served_and_every_route_has_its_file(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [])
    with TestClient(create_app(settings, ModelPool(settings, host(4 * GiB)))) as client:
        served = {route.path: client.get(route.path) for route in UI_ROUTES}
    assert all(answer.status_code == 200 for answer in served.values()), served
    files = {path.name: path.read_bytes() for path in PAGE.iterdir()}
    by_route = {"index.html" if path == UI.path else path.removeprefix("/ui/"): a.content for path, a in served.items()}
    assert by_route == files
    page = files["index.html"].decode()
    assert 'src="ui/app.js"' in page and 'href="ui/style.css"' in page  # relative: the page works under a prefix
    assert "http://" not in page and "https://" not in page  # no CDN


def test_the_package_data_ships_every_file_of_the_page() -> None:
    """A wheel holds only the non-Python files ``[tool.setuptools.package-data]`` names."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["memserve"]
    package = ROOT / "src" / "memserve"
    missing = [
        str(path.relative_to(package))
        for path in PAGE.iterdir()
        if not any(fnmatch(str(path.relative_to(package)), pattern) for pattern in patterns)
    ]
    assert not missing, (
        f"pyproject.toml's [tool.setuptools.package-data] memserve leaves out {missing}: an installed memserve "
        'would answer /ui with a 500; add "gateway/ui/*" to it'
    )
