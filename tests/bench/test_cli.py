"""``memserve bench`` end to end: the real CLI (click's runner) against fakes served by uvicorn on 127.0.0.1.

Timings through real sockets are not exact, so these tests check structure and loose bounds; the exact
numbers are proven in ``test_load.py`` on a virtual clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from memserve.cli import main
from memserve.wire.fake import NOT_JSON, FakeOpenAI, ReceivedRequest, Script
from tests.bench.test_prompts import write_tokenizer
from tests.serving import nothing_listening, serve_app, serve_fake


def bench(*args: str, env: dict[str, str] | None = None) -> Result:
    """``memserve bench`` as a user runs it at a terminal 200 columns wide: its tables honour ``COLUMNS`` when it is
    set (pytest-xdist's workers set it to 80, which cuts them)."""
    return CliRunner().invoke(main, ["bench", *args], env={"COLUMNS": "200", **(env or {})})


@contextmanager
def served(fake: FakeOpenAI) -> Iterator[str]:
    with serve_app(fake) as origin:  # type: ignore[arg-type]
        yield origin


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_run_prints_tables_and_writes_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "b.json", tmp_path / "plots" / "b.png"
    with served(FakeOpenAI(models=("m",))) as origin:
        result = bench(
            origin,
            "--model",
            "m",
            "--concurrency",
            "1,2",
            "--requests",
            "4",
            "--output-tokens",
            "8",
            "--json",
            str(out),
            "--plot",
            str(png),
        )
    assert result.exit_code == 0, result.output
    assert "TTFT p50" in result.stdout and "1 concurrent" in result.stdout and "2 concurrent" in result.stdout
    assert "A: " in result.stdout and "saturat" in result.stdout
    assert "client overhead (instant fake on 127.0.0.1, 2 concurrent): latency floor p50" in result.stdout
    assert "A @ 2 concurrent: 4 ok, 0 failed" in result.stderr  # plain progress lines when not a tty
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(out.read_text())
    assert data["schema"] == "memserve.bench/1" and data["error"] is None
    assert isinstance(data["command"], str) and data["started_at"] <= data["finished_at"]
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["platform"]
    assert data["settings"]["steps"] == [{"concurrency": 1}, {"concurrency": 2}]
    assert data["prompts"]["source"] == "synthetic"
    [target] = data["targets"]
    assert (target["name"], target["model"], target["base_url"]) == ("A", "m", f"{origin}/v1")
    assert "saturation" in target and target["saturation_summary"]
    for step in target["steps"]:
        assert (step["requests"], step["successful_requests"], step["error_rate"], step["errors"]) == (4, 4, 0.0, {})
        assert step["output_tokens_total"] == 4 * 8  # the fake's usage
        assert step["prompt_tokens_total"] == 4 * 128  # synthetic prompts: 128 words each
        ttft, e2e = step["ttft_seconds"], step["e2e_seconds"]
        assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"] < 10
        assert e2e["p50"] >= ttft["p50"]
        assert set(step["itl_seconds"]) == set(step["tpot_seconds"]) == {"p50", "p90", "p99"}
        assert step["output_tokens_per_second"] > 0 and step["requests_per_second"] > 0
    overhead = data["client_overhead"]
    assert overhead["concurrency"] == 2 and overhead["requests"] == 16 and overhead["failed_requests"] == 0
    assert 0 < overhead["latency_floor_seconds"]["p50"] <= overhead["latency_floor_seconds"]["p99"]
    assert overhead["max_output_tokens_per_second"] > 0
    assert [(o["target"], o["concurrency"]) for o in data["order"]] == [("A", 1), ("A", 2)]


def test_vs_alternates_step_by_step_and_prints_ratios(tmp_path: Path) -> None:
    received: list[ReceivedRequest] = []
    out = tmp_path / "vs.json"
    with (
        served(FakeOpenAI(models=("m-a",), requests=received)) as a,
        served(FakeOpenAI(models=("m-b",), requests=received)) as b,
    ):
        result = bench(
            a,
            "--model",
            "m-a",
            "--vs",
            b,
            "--vs-model",
            "m-b",
            "--concurrency",
            "1,2",
            "--requests",
            "2",
            "--output-tokens",
            "4",
            "--no-overhead",
            "--json",
            str(out),
        )
    assert result.exit_code == 0, result.output
    # warm-ups first, then A@1, B@1, A@2, B@2
    asked = [r.body["model"] for r in received if r.body is not None]
    assert asked == ["m-a", "m-b"] + ["m-a"] * 2 + ["m-b"] * 2 + ["m-a"] * 2 + ["m-b"] * 2
    data = json.loads(out.read_text())
    assert [(o["target"], o["concurrency"]) for o in data["order"]] == [("A", 1), ("B", 1), ("A", 2), ("B", 2)]
    assert data["comparison"]["ratio"] == "B/A"
    assert [s["concurrency"] for s in data["comparison"]["steps"]] == [1, 2]
    assert all(s["output_tokens_per_second"] > 0 for s in data["comparison"]["steps"])
    assert "B ÷ A" in result.stdout and "B÷A" in result.stdout
    assert result.stdout.count("no saturation up to 2 concurrent") + result.stdout.count("saturates at") == 2


def test_rate_steps_and_an_api_key(tmp_path: Path) -> None:
    out = tmp_path / "rate.json"
    with serve_fake(FakeOpenAI(models=("m",))) as fake:
        result = bench(
            fake.base_url,
            "--model",
            "m",
            "--rate",
            "50,100",
            "--requests",
            "3",
            "--no-overhead",
            "--api-key-env",
            "BENCH_TEST_KEY",
            "--json",
            str(out),
            env={"BENCH_TEST_KEY": "sekrit-123"},
        )
    assert result.exit_code == 0, result.output
    assert "50 req/s" in result.stdout and "100 req/s" in result.stdout
    assert {r.authorization for r in fake.requests} == {"Bearer sekrit-123"}
    text = out.read_text()
    assert "sekrit" not in text
    data = json.loads(text)
    assert data["settings"]["mode"] == "open_loop_poisson"
    assert [s["rate_requests_per_second"] for s in data["targets"][0]["steps"]] == [50.0, 100.0]


def test_a_local_model_folder_lends_its_tokenizer_and_its_name(tmp_path: Path) -> None:
    folder = write_tokenizer(tmp_path / "tiny-demo")
    out = tmp_path / "t.json"
    received: list[ReceivedRequest] = []
    with served(FakeOpenAI(models=("tiny-demo",), requests=received)) as origin:
        result = bench(
            origin,
            "--model",
            str(folder),
            "--concurrency",
            "1",
            "--requests",
            "2",
            "--prompt-tokens",
            "40",
            "--no-overhead",
            "--json",
            str(out),
        )
    assert result.exit_code == 0, result.output
    assert {r.body["model"] for r in received if r.body is not None} == {"tiny-demo"}
    prompts = json.loads(out.read_text())["prompts"]
    assert (prompts["source"], prompts["tokenizer"], prompts["prompt_tokens"]) == ("tokenizer", str(folder), 40)


def _unreachable() -> Iterator[str]:
    with nothing_listening() as url:
        yield url


def _model_404() -> Iterator[str]:
    with served(FakeOpenAI(models=("real-a", "real-b"))) as origin:
        yield origin


def _server_500() -> Iterator[str]:
    with serve_fake(FakeOpenAI(models=("m",), script=Script(error_status=500))) as fake:
        yield fake.base_url


def _not_sse() -> Iterator[str]:
    with serve_fake(FakeOpenAI(models=("m",), script=Script(not_json=NOT_JSON))) as fake:
        yield fake.base_url


@pytest.mark.parametrize(
    ("server", "model", "says"),
    [
        (_unreachable, "m", "(connection refused); is the server running? check the URL and port"),
        (
            _model_404,
            "wrong",
            "the server does not know model 'wrong' (HTTP 404: model 'wrong' is not served here); "
            "it serves: real-a, real-b; pass one of them with --model",
        ),
        (_server_500, "m", "the server failed: HTTP 500: the fake upstream was told to fail; check the server's logs"),
        (_not_sse, "m", "HTTP 200 text/plain; charset=utf-8, not an SSE stream: '<html><body>502 Bad Gateway"),
    ],
    ids=["unreachable", "unknown-model", "server-500", "not-sse"],
)
def test_bad_servers_get_one_clear_line_and_partial_json(tmp_path: Path, server: Any, model: str, says: str) -> None:
    out = tmp_path / "partial.json"
    with contextmanager(server)() as url:
        result = bench(
            url, "--model", model, "--concurrency", "1,2", "--requests", "2", "--no-overhead", "--json", str(out)
        )
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert line.startswith("error: warm-up request to ") and says in line
    assert result.stdout == ""
    data = json.loads(out.read_text())
    assert data["error"] == line.removeprefix("error: ")
    assert data["targets"][0]["steps"] == [] and data["finished_at"] is not None


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--concurrency", "4,x"], "Invalid value for '--concurrency': '4,x' is not a list of positive integers"),
        (["--concurrency", "0,2"], "'0,2' is not a list of positive integers"),
        (["--rate", "1,-2"], "'1,-2' is not a list of positive numbers"),
        (["--concurrency", "1", "--rate", "2"], "--concurrency and --rate exclude each other"),
        (["--duration", "soon"], "cannot read --duration 'soon'"),
        (["--vs-model", "x"], "--vs-model needs --vs URL2"),
    ],
)
def test_bad_flags_get_one_clear_line(tmp_path: Path, args: list[str], says: str) -> None:
    out = tmp_path / "never.json"
    result = bench("http://127.0.0.1:9", "--model", "m", *args, "--json", str(out))
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert says in line
    assert not out.exists()  # nothing ran, nothing measured


def test_a_missing_api_key_variable_is_named(tmp_path: Path) -> None:
    result = bench(
        "http://127.0.0.1:9", "--model", "m", "--api-key-env", "BENCH_TEST_UNSET", env={"BENCH_TEST_UNSET": ""}
    )
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert "--api-key-env BENCH_TEST_UNSET: that environment variable is not set" in line


def test_bench_never_imports_torch_and_the_gateway_never_imports_bench() -> None:
    code = (
        "import sys, memserve.cli.bench, memserve.bench\n"
        "assert 'torch' not in sys.modules, 'bench imported torch'\n"
        "assert 'matplotlib' not in sys.modules, 'bench imported matplotlib without --plot'\n"
        "for name in [m for m in sys.modules if m.startswith('memserve.bench')]: del sys.modules[name]\n"
        "import memserve.gateway.app\n"
        "assert not any(m.startswith('memserve.bench') for m in sys.modules), 'the gateway imported bench'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_public_surface_is_importable() -> None:
    import memserve.bench

    assert sorted(memserve.bench.__all__) == memserve.bench.__all__
    for name in memserve.bench.__all__:
        assert getattr(memserve.bench, name) is not None
    assert "bench" in CliRunner().invoke(main, ["--help"]).stdout
