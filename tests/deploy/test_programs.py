"""The deploy tests' own helpers: a missing program skips on a developer machine and fails under CI, and the
template is rendered as the nginx image's envsubst renders it."""

from __future__ import annotations

import pytest

from tests.deploy.programs import envsubst, program


def test_a_missing_program_skips_with_its_package_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.skip.Exception, match=r"install Debian's nopkg package \(apt-get install nopkg\)"):
        program("no-such-program-here", "nopkg")


def test_a_missing_program_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="CI must run this test"):
        program("no-such-program-here", "nopkg")


def test_envsubst_replaces_the_given_names_and_leaves_nginxs_variables() -> None:
    template = "server ${MEMSERVE_UPSTREAM}; listen $MEMSERVE_LISTEN; proxy_set_header Host $host${request_uri};"
    values = {"MEMSERVE_UPSTREAM": "memserve:8000", "MEMSERVE_LISTEN": "80"}
    assert envsubst(template, values) == "server memserve:8000; listen 80; proxy_set_header Host $host${request_uri};"
    with pytest.raises(AssertionError, match="MEMSERVE_MAX_BODY_MIB"):
        envsubst("client_max_body_size ${MEMSERVE_MAX_BODY_MIB}m;", values)
