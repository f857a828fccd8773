"""Exact latencies: the load generator and a scripted fake share a virtual clock (see ``virtual.py``).

Script times are powers of two, so sums are exact in floating point and most asserts are ``==``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from memserve.bench.load import LoadGenerator, Target, normalize_base_url, poisson_arrivals_seconds, stream_request
from memserve.bench.prompts import Prompt, SyntheticPrompts
from memserve.bench.run import BenchConfig, BenchReport, run_bench
from memserve.bench.stats import Percentiles, RequestRecord, Step
from memserve.errors import InvalidArgument
from memserve.wire.fake import FakeOpenAI, Script
from tests.bench.test_stats import about
from tests.bench.virtual import VirtualClock
from tests.serving import StreamingASGITransport, nothing_listening

F = 1 / 16  # first-token delay
G = 1 / 64  # gap between tokens
TOKENS = 4
S = F + (TOKENS - 1) * G  # one answer, start to end: 7/64
TARGET = Target("A", "http://fake.test/v1", "m")


def bench(
    script: Script,
    steps: list[Step],
    *,
    requests: int | None = 8,
    duration_seconds: float | None = None,
    output_tokens: int = TOKENS,
    saves: list[dict[str, Any]] | None = None,
    fake: FakeOpenAI | None = None,
    clock: VirtualClock | None = None,
) -> BenchReport:
    clock = clock or VirtualClock()
    fake = fake or FakeOpenAI(models=("m",), script=script, sleep=clock.sleep)
    config = BenchConfig(
        targets=(TARGET,),
        steps=tuple(steps),
        requests_per_step=requests,
        duration_seconds=duration_seconds,
        measure_overhead=False,
    )
    prompts = SyntheticPrompts(prompt_tokens=8, output_tokens=output_tokens, seed=0)

    def save(report: BenchReport) -> None:
        if saves is not None:
            saves.append(report.to_json())

    return clock.run(
        lambda: run_bench(
            config, prompts, clock=clock, sleep=clock.sleep, transport=StreamingASGITransport(fake), save=save
        )
    )


def test_ttft_itl_tpot_and_percentiles_are_exact() -> None:
    # the warm-up takes the first delay (1/32); the four counted requests get 1/16, 1/8, 1/4, 1/2
    script = Script(
        first_token_delays_seconds=(1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2), token_gaps_seconds=(G, 2 * G, 4 * G, G)
    )
    report = bench(script, [Step("concurrency", 1)], requests=4, output_tokens=5)
    [s] = report.results[0].steps
    assert (s.requests, s.successful_requests, s.output_tokens) == (4, 4, 20)
    # TTFT ranks 0..3 of [1/16, 1/8, 1/4, 1/2]: p50 at 1.5, p90 at 2.7, p99 at 2.97
    assert about(s.ttft_seconds) == pytest.approx((3 / 16, 0.25 + 0.7 * 0.25, 0.25 + 0.97 * 0.25))
    # each request's gaps are G, 2G, 4G, G: 8 × G, 4 × 2G, 4 × 4G over the step; p50 halfway between G and 2G
    assert s.itl_seconds == Percentiles(1.5 * G, 4 * G, 4 * G)
    # TPOT = (e2e − TTFT) / (5 − 1) = 8G / 4 for every request
    assert s.tpot_seconds == Percentiles(2 * G, 2 * G, 2 * G)
    e2e = [ttft + 8 * G for ttft in (1 / 16, 1 / 8, 1 / 4, 1 / 2)]
    assert s.e2e_seconds is not None and s.e2e_seconds.p50 == (e2e[1] + e2e[2]) / 2
    assert s.wall_seconds == sum(e2e)  # one at a time, back to back
    assert s.output_tokens_per_second == 20 / sum(e2e)
    assert s.requests_per_second == 4 / sum(e2e)
    assert s.prompt_tokens == 4 * 8  # the server's usage (the fake counts words)


def test_saturation_is_found_where_the_server_runs_out_of_slots() -> None:
    # two slots: 1 and 2 concurrent scale; at 4, two requests wait a whole answer (S) for a slot
    script = Script(first_token_delays_seconds=(F,), token_gaps_seconds=(G,), slots=2)
    report = bench(script, [Step("concurrency", c) for c in (1, 2, 4)])
    one, two, four = report.results[0].steps
    assert one.ttft_seconds == two.ttft_seconds == Percentiles(F, F, F)
    assert one.output_tokens_per_second == 8 * TOKENS / (8 * S)
    assert two.output_tokens_per_second == 8 * TOKENS / (4 * S)
    assert four.output_tokens_per_second == two.output_tokens_per_second
    # at 4: 2 of 8 requests start at once (TTFT F); 6 wait one answer for a slot (TTFT S + F)
    assert four.ttft_seconds == Percentiles(S + F, S + F, S + F)
    assert four.e2e_seconds is not None and four.e2e_seconds.p50 == 2 * S
    saturation = report.results[0].saturation
    assert saturation is not None
    assert (saturation.step, saturation.reason, saturation.throughput_gain) == (
        Step("concurrency", 4),
        "throughput",
        0.0,
    )
    assert saturation.ttft_p50_ratio == (S + F) / F == 2.75
    assert saturation.message == "saturates at 4 concurrent: throughput +0% over 2 while TTFT p50 ×2.8"


def test_a_full_queue_is_an_error_saturation() -> None:
    # two slots and one waiting place: the fourth request in flight gets 429
    script = Script(first_token_delays_seconds=(F,), token_gaps_seconds=(G,), slots=2, queue_limit=1)
    report = bench(script, [Step("concurrency", 2), Step("concurrency", 4)])
    two, four = report.results[0].steps
    assert two.errors == {}
    assert four.errors.get("http_429", 0) > 0 and set(four.errors) == {"http_429"}
    assert "queue is full" in four.error_examples["http_429"]
    saturation = report.results[0].saturation
    assert saturation is not None and (saturation.step.value, saturation.reason) == (4, "errors")


def test_duration_limits_a_step_by_the_clock() -> None:
    # one worker, answers of S = 0.109375 s: sends at 0, S, 2S, 3S, 4S (< 0.5), and not at 5S
    report = bench(
        Script(first_token_delays_seconds=(F,), token_gaps_seconds=(G,)),
        [Step("concurrency", 1)],
        requests=None,
        duration_seconds=0.5,
    )
    [s] = report.results[0].steps
    assert s.requests == 5
    assert s.wall_seconds == 5 * S


def test_the_report_is_saved_after_every_step_and_a_failing_target_stops() -> None:
    clock = VirtualClock()
    fake = FakeOpenAI(models=("m",), script=Script(first_token_delays_seconds=(F,)), sleep=clock.sleep)
    saves: list[dict[str, Any]] = []

    def break_after_first_step(report: BenchReport) -> None:
        saves.append(report.to_json())
        if report.results[0].steps:
            fake.script = Script(error_after_tokens=1)  # the runner "dies" after one token from now on

    config = BenchConfig(
        targets=(TARGET,),
        steps=(Step("concurrency", 1), Step("concurrency", 2), Step("concurrency", 4)),
        requests_per_step=4,
        measure_overhead=False,
    )
    prompts = SyntheticPrompts(prompt_tokens=8, output_tokens=TOKENS, seed=0)
    report = clock.run(
        lambda: run_bench(
            config,
            prompts,
            clock=clock,
            sleep=clock.sleep,
            transport=StreamingASGITransport(fake),
            save=break_after_first_step,
        )
    )
    steps_per_save = [len(saved["targets"][0]["steps"]) for saved in saves]
    assert steps_per_save == [0, 1, 2, 2]  # after warm-up, after each step that ran, at the end
    result = report.results[0]
    assert len(result.steps) == 2  # the step at 4 never ran
    assert result.steps[1].errors == {"stream_error": 4}
    assert result.stopped is not None and "every request at 2 concurrent failed (stream_error ×4)" in result.stopped
    assert saves[-1]["targets"][0]["saturation"]["reason"] == "errors"
    assert saves[-1]["finished_at"] is not None


def test_open_loop_sends_at_poisson_arrival_times() -> None:
    clock = VirtualClock()
    fake = FakeOpenAI(
        models=("m",), script=Script(first_token_delays_seconds=(F,), token_gaps_seconds=(G,)), sleep=clock.sleep
    )
    prompt = Prompt(max_tokens=TOKENS, text="hello there")

    async def main() -> tuple[float, list[RequestRecord]]:
        async with httpx.AsyncClient(transport=StreamingASGITransport(fake)) as client:
            generator = LoadGenerator(client, TARGET, clock=clock, sleep=clock.sleep, timeout_seconds=60)
            started = clock()
            records = await generator.open_loop(
                lambda i: prompt, rate_per_second=4.0, max_requests=12, duration_seconds=None, seed=7
            )
            return started, records

    started, records = clock.run(main)
    sends = sorted(r.send_seconds - started for r in records)
    assert sends == pytest.approx(poisson_arrivals_seconds(4.0, 12, seed=7), abs=1e-12)
    assert all(r.ttft_seconds == pytest.approx(F, abs=1e-12) for r in records)  # no slots: nobody waits


def test_open_loop_max_concurrency_holds_requests_back() -> None:
    clock = VirtualClock()
    fake = FakeOpenAI(
        models=("m",), script=Script(first_token_delays_seconds=(F,), token_gaps_seconds=(G,)), sleep=clock.sleep
    )
    prompt = Prompt(max_tokens=TOKENS, text="hello")

    async def main() -> list[RequestRecord]:
        async with httpx.AsyncClient(transport=StreamingASGITransport(fake)) as client:
            generator = LoadGenerator(client, TARGET, clock=clock, sleep=clock.sleep, timeout_seconds=60)
            return await generator.open_loop(
                lambda i: prompt,
                rate_per_second=1000.0,
                max_requests=6,
                duration_seconds=None,
                seed=1,
                max_concurrency=1,
            )

    records = sorted(clock.run(main), key=lambda r: r.send_seconds)
    assert len(records) == 6
    for earlier, later in itertools.pairwise(records):
        assert later.send_seconds >= earlier.finish_seconds  # one in flight at a time


def test_poisson_arrivals_have_the_asked_mean_gap() -> None:
    times = poisson_arrivals_seconds(4.0, 4001, seed=0)
    assert times[0] == 0.0 and times == sorted(times)
    assert times[-1] / 4000 == pytest.approx(0.25, rel=0.1)
    assert poisson_arrivals_seconds(4.0, 10, seed=0) == times[:10]  # a fixed seed repeats


# --- one request's failures, by kind --------------------------------------------------------------------------


def _sse_response(body: bytes, content_type: str = "text/event-stream", status: int = 200) -> httpx.Response:
    return httpx.Response(status, headers={"content-type": content_type}, content=body)


class _DropsMidway(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
        raise httpx.ReadError("connection reset by peer")


async def _never_answers(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(30)
    raise AssertionError("the request should have timed out")


GOOD_CHUNK = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'


@pytest.mark.parametrize(
    ("handler", "kind", "says"),
    [
        (
            lambda r: _sse_response(b'{"error": {"message": "slow down"}}', "application/json", 429),
            "http_429",
            "HTTP 429: slow down",
        ),
        (lambda r: _sse_response(b"<html>oops</html>", "text/html", 503), "http_503", "HTTP 503: '<html>oops</html>'"),
        (
            lambda r: _sse_response(b"<html>hello</html>", "text/html"),
            "bad_stream",
            "HTTP 200 text/html, not an SSE stream: '<html>hello</html>'",
        ),
        (lambda r: _sse_response(GOOD_CHUNK + b"data: {not json\n\n"), "bad_stream", "an SSE event is not JSON"),
        (
            lambda r: _sse_response(GOOD_CHUNK),
            "bad_stream",
            "the stream ended without a finish_reason or data: [DONE]; the answer is incomplete",
        ),
        (
            lambda r: _sse_response(GOOD_CHUNK + b'data: {"error": {"message": "runner died"}}\n\ndata: [DONE]\n\n'),
            "stream_error",
            "the server sent an error mid-stream: runner died",
        ),
        (
            lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_DropsMidway()),
            "disconnect",
            "the connection dropped mid-response",
        ),
        (_never_answers, "timeout", "no complete answer within --timeout 0.05 s"),
    ],
)
def test_failures_are_recorded_by_kind(handler: Any, kind: str, says: str) -> None:
    async def main() -> RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream_request(
                client,
                TARGET,
                Prompt(max_tokens=4, text="hi"),
                clock=asyncio.get_running_loop().time,
                timeout_seconds=0.05,
            )

    record = asyncio.run(main())
    assert record.error_kind == kind
    assert record.error_message is not None and says in record.error_message
    assert record.finish_seconds >= record.send_seconds


def test_a_refused_connection_is_a_connect_error() -> None:
    with nothing_listening() as base_url:
        target = Target("A", base_url, "m")

        async def main() -> RequestRecord:
            async with httpx.AsyncClient() as client:
                return await stream_request(
                    client,
                    target,
                    Prompt(max_tokens=4, text="hi"),
                    clock=asyncio.get_running_loop().time,
                    timeout_seconds=5,
                )

        record = asyncio.run(main())
    assert record.error_kind == "connect"
    assert "connection refused" in (record.error_message or "")


def test_usage_counts_win_over_chunk_counts_and_role_chunks_are_not_content() -> None:
    body = (
        b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
        + GOOD_CHUNK
        + GOOD_CHUNK
        + b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\ndata: [DONE]\n\n'
    )

    async def main() -> RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: _sse_response(body))) as client:
            return await stream_request(
                client,
                TARGET,
                Prompt(max_tokens=4, text="hi"),
                clock=asyncio.get_running_loop().time,
                timeout_seconds=5,
            )

    record = asyncio.run(main())
    assert record.ok
    assert len(record.content_seconds) == 2
    assert (record.output_tokens, record.prompt_tokens) == (3, 7)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://h:8123", "http://h:8123/v1"),
        ("http://h:8123/", "http://h:8123/v1"),
        ("http://h:8123/v1/", "http://h:8123/v1"),
        ("https://api.example.com/v1", "https://api.example.com/v1"),
    ],
)
def test_base_urls_end_in_v1(url: str, base: str) -> None:
    assert normalize_base_url(url) == base


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://h/v1", "http://"])
def test_a_bad_url_is_refused(url: str) -> None:
    with pytest.raises(InvalidArgument, match="http"):
        normalize_base_url(url)


def test_a_stream_that_gives_its_finish_reason_and_closes_is_complete_without_done() -> None:
    """transformers serve ends its streams after the finish_reason chunk, with no ``data: [DONE]``."""
    body = GOOD_CHUNK + (
        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], '
        b'"usage": {"prompt_tokens": 5, "completion_tokens": 1}}\n\n'
    )

    async def main() -> RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: _sse_response(body))) as client:
            return await stream_request(
                client,
                TARGET,
                Prompt(max_tokens=4, text="hi"),
                clock=asyncio.get_running_loop().time,
                timeout_seconds=5,
            )

    record = asyncio.run(main())
    assert record.ok, record.error_message
    assert (record.output_tokens, record.prompt_tokens) == (1, 5)
