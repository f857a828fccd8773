"""The container files, checked without Docker (none on the CI machine): compose.yaml wires what the other files
expect (ports, mounts, secrets, the one body limit), the container's memserve.yaml loads, and the entry point
reads the admin key from its file. Building the image and ``docker compose up`` are not run by any test."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from memserve.config import Settings, load_settings
from tests.deploy.programs import DEPLOY, REPO

ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def default(value: str) -> str:
    """A compose value with its ``${NAME:-default}`` interpolations replaced by their defaults."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_only_nginx_and_grafana_publish_ports_and_grafana_only_on_loopback() -> None:
    services = compose()["services"]
    assert set(services) == {"memserve", "nginx", "prometheus", "grafana"}
    assert "ports" not in services["memserve"] and "ports" not in services["prometheus"]
    assert services["memserve"]["expose"] == ["8000"]
    assert [default(p) for p in services["nginx"]["ports"]] == ["8080:80"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    assert services["nginx"]["depends_on"]["memserve"] == {"condition": "service_healthy"}


def test_nginx_gets_every_name_its_template_uses_and_the_same_body_limit_as_memserve() -> None:
    services = compose()["services"]
    nginx = services["nginx"]
    template = (DEPLOY / "nginx" / "memserve.conf.template").read_text()
    used = set(re.findall(r"\$\{?(MEMSERVE_[A-Z0-9_]+)", template))
    assert used == {"MEMSERVE_UPSTREAM", "MEMSERVE_LISTEN", "MEMSERVE_MAX_BODY_MIB"}
    env = nginx["environment"]
    assert used <= set(env) and env["NGINX_ENVSUBST_FILTER"] == "^MEMSERVE_"
    assert env["MEMSERVE_UPSTREAM"] == "memserve:8000"
    # the image renders /etc/nginx/templates/X.template to /etc/nginx/conf.d/X: default.conf replaces its welcome page
    assert "./nginx/memserve.conf.template:/etc/nginx/templates/default.conf.template:ro" in nginx["volumes"]
    mib = int(default(str(env["MEMSERVE_MAX_BODY_MIB"])))
    memserve_limit = default(services["memserve"]["environment"]["MEMSERVE_MAX_BODY_BYTES"])
    assert memserve_limit == f"{mib}MiB"
    assert mib << 20 == Settings.model_fields["max_body_bytes"].default  # and both are memserve's own default


def test_every_mounted_file_is_in_the_repository_and_the_secrets_are_where_prometheus_reads_them() -> None:
    spec = compose()
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source = default(volume.split(":")[0])
            if source.startswith("./") and source != "./models":  # ./models: the user's own, made by them
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which deploy/ does not have"
    assert {s: v["file"] for s, v in spec["secrets"].items()} == {
        "memserve_admin_key": "./secrets/memserve_admin_key",
        "grafana_admin_password": "./secrets/grafana_admin_password",
    }
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["authorization"]["credentials_file"] == "/run/secrets/memserve_admin_key"
    assert "memserve_admin_key" in spec["services"]["prometheus"]["secrets"]
    assert scrape["static_configs"][0]["targets"] == ["memserve:8000"]
    env = spec["services"]["memserve"]["environment"]
    assert env["MEMSERVE_ADMIN_KEY_FILE"] == "/run/secrets/memserve_admin_key"


def test_the_containers_configuration_loads_with_keys_on_all_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("MEMSERVE_")]:
        monkeypatch.delenv(name)
    settings = load_settings(DEPLOY / "memserve.yaml")
    assert (settings.host, settings.port, settings.auth, str(settings.data_dir)) == ("0.0.0.0", 8000, "keys", "/data")
    assert [m.source for m in settings.models] == [
        compose()["services"]["memserve"]["environment"]["MEMSERVE_DEMO_MODEL"]
    ]


def test_the_dockerfile_runs_memserve_as_a_user_with_data_in_a_volume() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER memserve$", text, re.M) and re.search(r'^VOLUME \["/data"\]$', text, re.M)
    assert 'ARG TORCH_SPEC="torch==2.13.0"' in text and "ARG BASE_IMAGE=" in text
    assert text.index("${TORCH_SPEC}") < text.index('pip install "/src/memserve')  # torch first, as the Makefile
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"COPY {path}: not in the repository"
            assert f"!{path}" in ignore or f"!{path}/" in ignore, f"COPY {path}: the .dockerignore leaves it out"


def run_entrypoint(tmp_path: Path, env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    memserve = fake_bin / "memserve"  # records what the entry point asked of memserve, instead of doing it
    memserve.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "memserve.calls"}\n')
    memserve.chmod(0o755)
    base = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *command], env={**base, **env}, capture_output=True, text=True, timeout=30
    )


def test_the_entrypoint_reads_the_admin_key_from_its_file(tmp_path: Path) -> None:
    key = tmp_path / "memserve_admin_key"
    key.write_text("ms-secret-key\n")
    ran = run_entrypoint(tmp_path, {"MEMSERVE_ADMIN_KEY_FILE": str(key)}, "env")
    assert ran.returncode == 0, ran.stderr
    assert "MEMSERVE_ADMIN_KEY=ms-secret-key\n" in ran.stdout and "MEMSERVE_ADMIN_KEY_FILE" not in ran.stdout
    missing = run_entrypoint(tmp_path, {"MEMSERVE_ADMIN_KEY_FILE": str(tmp_path / "nope")}, "env")
    assert missing.returncode == 1 and "cannot be read" in missing.stderr and missing.stdout == ""
    key.write_text("")
    empty = run_entrypoint(tmp_path, {"MEMSERVE_ADMIN_KEY_FILE": str(key)}, "env")
    assert empty.returncode == 1 and "is empty" in empty.stderr


def test_the_entrypoint_makes_the_demo_model_once(tmp_path: Path) -> None:
    model = tmp_path / "models" / "demo-tiny"
    ran = run_entrypoint(tmp_path, {"MEMSERVE_DEMO_MODEL": str(model)}, "true")
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "memserve.calls").read_text() == f"demo-model {model} --size tiny\n"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert run_entrypoint(tmp_path, {"MEMSERVE_DEMO_MODEL": str(model)}, "true").returncode == 0
    assert (tmp_path / "memserve.calls").read_text().count("demo-model") == 1  # there already: not made again
