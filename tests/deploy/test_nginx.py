"""Debian's real nginx, on the shipped ``deploy/nginx/memserve.conf.template`` rendered as the compose file renders
it, in front of a real gateway whose model is a provider faked on 127.0.0.1.

The fake sends the first token and then holds the rest until the test has read that token through nginx, so a
proxy that buffered the stream fails the test (the first token never comes) rather than passing by luck of timing.
The template's commented TLS lines are switched on as the README says and serve HTTPS with a certificate made here.
"""

from __future__ import annotations

import json
import os
import pwd
import ssl
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.config import ProviderConfig
from tests.deploy.programs import DEPLOY, envsubst, program, stop, wait_for_port
from tests.gateway.test_gateway_process import GiB, gateway, host, settings_for
from tests.serving import FakeOpenAI, Script, free_port, serve_fake

MiB = 1 << 20
LIMIT_MIB = 1  # the test's body limit, for nginx and the gateway alike (compose sets both from one value)
MESSAGES = [{"role": "user", "content": "tell me a story"}]
TOKENS = 6


@pytest.fixture
def nginx() -> str:
    return program("nginx", "nginx")


@contextmanager
def nginx_in_front(
    nginx: str, upstream: str, tmp_path: Path, edit: Callable[[str, int], str] | None = None
) -> Iterator[str]:
    """nginx on a free port with the shipped template in its http block; yields its origin.

    The main file stands in for the nginx image's ``/etc/nginx/nginx.conf`` (which includes conf.d/*.conf in
    http); pid, logs and temp files are in ``tmp_path``, so it runs as any user. As root, the workers run as
    root too: the default ``nobody`` could not enter pytest's private tmp folder for its temp files. ``edit``
    changes the template (and gets the port) as a user would before it is rendered.
    """
    port = free_port()
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    template = (DEPLOY / "nginx" / "memserve.conf.template").read_text()
    if edit is not None:
        template = edit(template, port)
    values = {
        "MEMSERVE_UPSTREAM": upstream.removeprefix("http://"),
        "MEMSERVE_LISTEN": f"127.0.0.1:{port}",
        "MEMSERVE_MAX_BODY_MIB": str(LIMIT_MIB),
    }
    (conf_d / "memserve.conf").write_text(envsubst(template, values))
    user = f"user {pwd.getpwuid(0).pw_name};" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"""daemon off;
{user}
worker_processes 1;
pid {tmp_path / "nginx.pid"};
error_log {tmp_path / "error.log"} info;
events {{ worker_connections 64; }}
http {{
    access_log {tmp_path / "access.log"};
{temp}
    include {conf_d}/*.conf;
}}
"""
    )
    argv = [nginx, "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log")]
    checked = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx -t refused the rendered template:\n{checked.stderr}"
    log = tmp_path / "nginx.out"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, tmp_path / "error.log", "nginx")
        yield f"{'https' if edit else 'http'}://127.0.0.1:{port}"
    finally:
        stop(process, "nginx")


@contextmanager
def stack(
    nginx: str, tmp_path: Path, script: Script, edit: Callable[[str, int], str] | None = None
) -> Iterator[tuple[str, FakeOpenAI]]:
    """The fake provider, a gateway serving it as ``fake/fake-model``, and nginx in front; yields nginx's origin."""
    with serve_fake(FakeOpenAI(models=["fake-model"], script=script)) as fake:
        provider = ProviderConfig(name="fake", base_url=fake.base_url, models=["fake-model"])
        settings = settings_for(tmp_path, [], providers=[provider], max_body_bytes=LIMIT_MIB * MiB)
        with gateway(settings, host(4 * GiB)) as (origin, _), nginx_in_front(nginx, origin, tmp_path, edit) as front:
            try:
                yield front, fake
            finally:
                fake.release()  # a stream still held must end before the gateway stops


def content(line: str) -> str | None:
    """The text of one SSE line's chunk, if it carries any."""
    if not line.startswith("data: {"):
        return None
    choices: list[dict[str, Any]] = json.loads(line.removeprefix("data: "))["choices"]
    return choices[0]["delta"].get("content") if choices else None


def test_a_stream_crosses_nginx_token_by_token(nginx: str, tmp_path: Path) -> None:
    with (
        stack(nginx, tmp_path, Script(reply_tokens=TOKENS, hold_after_tokens=1)) as (front, fake),
        httpx.Client(timeout=httpx.Timeout(10, read=60)) as client,
    ):
        body = {"model": "fake/fake-model", "messages": MESSAGES, "stream": True}
        with client.stream("POST", f"{front}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            try:
                first = next(text for line in lines if (text := content(line)))
            except httpx.ReadTimeout:
                pytest.fail("the first token did not come through nginx while the rest was held: it buffers the stream")
            # the fake is still holding every other token: this one crossed nginx on its own
            assert fake.held.wait(timeout=30) and bytes(fake.sent[-1]).count(b"data: ") == 2  # role, first token
            fake.release()
            rest = [text for line in lines if (text := content(line))]
        assert [first, *rest] == ["Hello", " from", " the", " fake", " upstream.", " Hello"]


def test_a_body_over_the_limit_is_refused_by_nginx_in_openais_shape(nginx: str, tmp_path: Path) -> None:
    with stack(nginx, tmp_path, Script()) as (front, fake):
        big = {"model": "fake/fake-model", "messages": [{"role": "user", "content": "x" * (LIMIT_MIB * MiB)}]}
        response = httpx.post(f"{front}/v1/chat/completions", json=big, timeout=60)
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
        assert f"client_max_body_size {LIMIT_MIB} MiB" in error["message"]  # nginx's words, not the gateway's
        assert fake.requests == []


def test_a_normal_request_and_the_model_list_are_relayed(nginx: str, tmp_path: Path) -> None:
    with stack(nginx, tmp_path, Script()) as (front, fake):
        body = {"model": "fake/fake-model", "messages": MESSAGES, "max_tokens": 3}
        response = httpx.post(f"{front}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "Hello from the"
        assert [r.body["messages"] for r in fake.requests if r.body] == [MESSAGES]
        models = httpx.get(f"{front}/v1/models", timeout=60)
        assert models.status_code == 200 and "fake/fake-model" in {m["id"] for m in models.json()["data"]}


def with_tls(certificate: Path, key: Path) -> Callable[[str, int], str]:
    """What the README tells a user to do for TLS: the commented ``ssl`` lines instead of the plain ``listen``
    (on the test's port, with the test's certificate)."""

    def edit(template: str, port: int) -> str:
        plain = "    listen ${MEMSERVE_LISTEN};\n"
        assert plain in template
        template = template.replace(plain, "")
        for line in ("listen 443 ssl;", "ssl_certificate ", "ssl_certificate_key ", "ssl_protocols "):
            commented = f"    # {line}"
            assert commented in template, f"the template has no commented {line!r} line"
            template = template.replace(commented, f"    {line}")
        template = template.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
        template = template.replace("/etc/nginx/certs/fullchain.pem", str(certificate))
        return template.replace("/etc/nginx/certs/privkey.pem", str(key))

    return edit


def test_the_commented_tls_lines_serve_https_with_the_users_certificate(nginx: str, tmp_path: Path) -> None:
    openssl = program("openssl", "openssl")
    certificate, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    made = subprocess.run(
        [openssl, *request, "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(certificate)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    with (
        stack(nginx, tmp_path, Script(reply_tokens=3), with_tls(certificate, key)) as (front, _),
        httpx.Client(verify=ssl.create_default_context(cafile=certificate), timeout=60) as client,
    ):
        assert front.startswith("https://")
        body = {"model": "fake/fake-model", "messages": MESSAGES, "stream": True}
        with client.stream("POST", f"{front}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert [text for line in response.iter_lines() if (text := content(line))] == ["Hello", " from", " the"]
