"""Per-key limits (gateway/limits.py) on a fake usage log and an injected clock: no sleeps, no database.

A "gateway" here is a Limiter; two Limiters on one FakeLog are two gateways sharing one Postgres. A request's
usage row is recorded the way the gateway records it: right after ``done()``, at its ``admitted_at``, with its
prompt and completion tokens.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from memserve.errors import InvalidArgument, RateLimited, StoreUnavailable
from memserve.gateway.limits import Admission, Limiter

T0 = datetime(2026, 11, 30, 9, 0, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Key:
    id: str = "k1"
    name: str = "ci"
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None


@dataclass
class Row:
    key_id: str
    time: datetime
    tokens: int


@dataclass
class FakeLog:
    """The usage log's two counts over rows in memory; each query yields to the loop, as a real one does."""

    rows: list[Row] = field(default_factory=list)
    queries: list[tuple[str, datetime]] = field(default_factory=list)
    during_query: list[Callable[[], None]] = field(default_factory=list)  # run while a query is away
    answer_first: bool = False  # what happens during a query is in its answer (False) or not (True)
    fail: bool = False

    async def _count(self, key_id: str, since: datetime, weight: Callable[[Row], int]) -> int:
        if self.fail:
            raise StoreUnavailable("the database at /tmp/memserve.db is locked; try again")
        count = sum(weight(r) for r in self.rows if r.key_id == key_id and r.time >= since)
        for _ in range(3):
            await asyncio.sleep(0)
        while self.during_query:
            self.during_query.pop()()
        return (
            count if self.answer_first else sum(weight(r) for r in self.rows if r.key_id == key_id and r.time >= since)
        )

    async def tokens_since(self, key_id: str, since: datetime) -> int:
        self.queries.append(("tokens", since))
        return await self._count(key_id, since, lambda r: r.tokens)

    async def requests_since(self, key_id: str, since: datetime) -> int:
        self.queries.append(("requests", since))
        return await self._count(key_id, since, lambda r: 1)

    def add(self, key_id: str, time: datetime, tokens: int = 0, requests: int = 1) -> None:
        """Rows another gateway recorded."""
        self.rows.extend(Row(key_id, time, tokens) for _ in range(requests))


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Gateway:
    """A Limiter, and the usage rows its requests write when they end."""

    def __init__(self, log: FakeLog, clock: Clock, refresh_seconds: float = 2.0) -> None:
        self.log = log
        self.limiter = Limiter(log, clock=clock, refresh_seconds=refresh_seconds)

    def admit(self, key: Key, prompt_tokens: int = 0) -> Admission:
        return asyncio.run(self.limiter.admit(key, prompt_tokens))

    def refused(self, key: Key, prompt_tokens: int = 0) -> RateLimited:
        with pytest.raises(RateLimited) as refused:
            self.admit(key, prompt_tokens)
        return refused.value

    def end(self, admission: Admission) -> None:
        admission.done()
        self.log.rows.append(Row(admission.key_id, admission.admitted_at, admission.tokens))

    def request(self, key: Key, prompt_tokens: int = 0, completion_tokens: int = 0) -> Admission:
        admission = self.admit(key, prompt_tokens)
        admission.completion(completion_tokens)
        self.end(admission)
        return admission


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def log() -> FakeLog:
    return FakeLog()


@pytest.fixture
def gw(log: FakeLog, clock: Clock) -> Gateway:
    return Gateway(log, clock)


# --- requests per minute -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spacing_seconds", "end_them"),
    [(0, True), (0, False), (0.5, True), (0.5, False), (0.95, True), (2.5 / 3, False)],
)
def test_the_61st_request_of_60_per_minute_is_refused(
    gw: Gateway, clock: Clock, spacing_seconds: float, end_them: bool
) -> None:
    """Whether the requests ended (their rows in the log, read again every 2 s) or are still in flight."""
    key = Key(rpm=60)
    for _ in range(60):
        admission = gw.admit(key)
        if end_them:
            gw.end(admission)
        clock.advance(spacing_seconds)
    refused = gw.refused(key)
    assert refused.status_code == 429
    assert refused.code == "rate_limit_exceeded"
    assert refused.error_type == "rate_limit_error"
    assert "reached its limit of 60 requests per minute (60 in the last minute)" in refused.message


def test_the_minute_slides_and_retry_after_says_when(gw: Gateway, clock: Clock) -> None:
    """60 requests, one a second from 09:00:00: each frees its place exactly 60 s after it was admitted."""
    key = Key(rpm=60)
    for _ in range(60):
        gw.request(key)
        clock.advance(1)
    clock.now = T0 + timedelta(seconds=59.5)
    refused = gw.refused(key)
    assert refused.retry_after_seconds == pytest.approx(0.5)
    assert refused.message == (
        "key 'ci' reached its limit of 60 requests per minute (60 in the last minute); "
        "it resets at 2026-11-30 09:01:00 UTC: retry in 1 s"
    )
    clock.now = T0 + timedelta(seconds=59.999)
    gw.refused(key)
    clock.now = T0 + timedelta(seconds=60)
    gw.request(key)  # 09:00:00's request left the minute
    refused = gw.refused(key)  # 09:00:01's has not
    assert refused.retry_after_seconds == pytest.approx(1.0)
    clock.now = T0 + timedelta(seconds=61)
    gw.request(key)


def test_retry_after_counts_requests_still_in_flight(gw: Gateway, clock: Clock) -> None:
    """A request counts from its admission, ended or not."""
    key = Key(rpm=3)
    first = gw.admit(key)
    clock.advance(10)
    gw.admit(key)
    gw.admit(key)
    clock.advance(5)
    assert gw.refused(key).retry_after_seconds == pytest.approx(45)
    gw.end(first)
    clock.advance(44)
    gw.refused(key)
    clock.advance(1)
    gw.admit(key)


# --- tokens per minute ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "refused_at"),
    [
        ([300, 300, 300, 300], 3),  # 900 + 300 > 1000
        ([300, 300, 300, 100, 1], 4),  # 1000 exactly passes; one more token does not
        ([1000, 1], 1),
        ([999, 1, 0], 2),  # a spent minute refuses even an empty prompt
        ([0, 0, 0, 600, 401], 4),
    ],
)
def test_the_request_whose_prompt_passes_tpm_is_refused(
    gw: Gateway, clock: Clock, prompts: list[int], refused_at: int
) -> None:
    key = Key(tpm=1000)
    for i, prompt in enumerate(prompts):
        if i == refused_at:
            refused = gw.refused(key, prompt)
            assert refused.code == "rate_limit_exceeded"
            assert f"this request's prompt is {prompt:,}" in refused.message
            break
        gw.request(key, prompt)
        clock.advance(0.7)
    else:
        assert refused_at == len(prompts), "every request passed"


def test_the_tpm_message_and_retry_after(gw: Gateway, clock: Clock) -> None:
    key = Key(tpm=1000)
    gw.request(key, 400)  # 09:00:00
    clock.advance(20)
    gw.request(key, 400)  # 09:00:20
    clock.advance(10)
    refused = gw.refused(key, 300)  # 800 + 300: 09:00:00's 400 must leave, at 09:01:00
    assert refused.retry_after_seconds == pytest.approx(30)
    assert refused.message == (
        "key 'ci' reached its limit of 1,000 tokens per minute (800 in the last minute; this request's prompt "
        "is 300); it resets at 2026-11-30 09:01:00 UTC: retry in 30 s"
    )
    refused = gw.refused(key, 700)  # both must leave
    assert refused.retry_after_seconds == pytest.approx(50)
    clock.now = T0 + timedelta(seconds=60)
    gw.request(key, 300)


@pytest.mark.parametrize(
    ("key", "code", "what", "flag"),
    [
        (Key(tpm=1000), "rate_limit_exceeded", "its limit of 1,000 tokens per minute", "--tpm"),
        (Key(daily_tokens=1000), "insufficient_quota", "its daily quota of 1,000 tokens", "--daily-tokens"),
        (Key(monthly_tokens=1000), "insufficient_quota", "its monthly quota of 1,000 tokens", "--monthly-tokens"),
        (
            Key(rpm=5, monthly_tokens=1000),
            "insufficient_quota",
            "its monthly quota of 1,000 tokens",
            "--monthly-tokens",
        ),
    ],
)
def test_a_prompt_larger_than_a_whole_limit_is_a_400_that_says_it_can_never_pass(
    gw: Gateway, log: FakeLog, key: Key, code: str, what: str, flag: str
) -> None:
    """No wait lets it pass, so no Retry-After and no 429 (the openai client retries every 429): a 400, decided
    before any query, so a failing store or a spent minute does not hide it behind a 503 or a 429."""
    log.fail = True
    with pytest.raises(InvalidArgument) as caught:
        gw.admit(key, 1001)
    refused = caught.value
    assert (refused.status_code, refused.error_type, refused.code) == (400, "invalid_request_error", code)
    assert not hasattr(refused, "retry_after_seconds") and log.queries == []
    assert refused.message == (
        f"key 'ci' has {what}, and this request's prompt alone is 1,001 tokens: it can never pass, however long "
        f"it waits; shorten the prompt, or ask an admin to raise the key's limit (memserve keys update ci {flag} N)"
    )
    log.fail = False
    gw.request(key, 1000)  # the whole limit, with nothing used yet, passes


def test_the_command_in_a_never_message_quotes_the_key_name(gw: Gateway) -> None:
    with pytest.raises(InvalidArgument, match=r"\(memserve keys update 'team a' --tpm N\)$"):
        gw.admit(Key(name="team a", tpm=10), 11)


def test_a_quota_with_too_little_left_today_is_a_429_until_the_reset(gw: Gateway, clock: Clock) -> None:
    """Unlike a prompt above the whole quota, this one passes after the reset: Retry-After says when."""
    key = Key(daily_tokens=1000)
    gw.request(key, 600)
    refused = gw.refused(key, 500)
    assert (refused.status_code, refused.code) == (429, "insufficient_quota")
    assert refused.retry_after_seconds == pytest.approx(15 * 3600)
    clock.now = datetime(2026, 12, 1, tzinfo=UTC)
    gw.request(key, 500)


def test_the_openai_client_does_not_retry_a_request_that_can_never_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the gateway, with the client's default retries: one request reaches it (one usage row), the
    answer has no Retry-After, and the client raises at once with the message."""
    import openai

    from tests.gateway.test_keys import CHAT, keyed_gateway, new_key, usage_rows

    long_prompt = [{"role": "user", "content": "word " * 400}]  # about 500 tokens by the estimate
    with keyed_gateway(tmp_path, monkeypatch) as (origin, fake):
        secret = new_key(origin, "small", tpm=100)
        client = openai.OpenAI(base_url=f"{origin}/v1", api_key=secret)  # max_retries: the default, 2
        with pytest.raises(openai.BadRequestError, match="it can never pass") as caught:
            client.chat.completions.create(**{**CHAT, "messages": long_prompt})
        assert "retry-after" not in caught.value.response.headers
        assert caught.value.code == "rate_limit_exceeded"
        assert client.chat.completions.create(**CHAT).choices  # a short prompt still passes
        assert len(fake.requests) == 1  # only the short one reached the provider
    rows = usage_rows(tmp_path)
    assert [(r["status"], r["admitted"]) for r in rows] == [(400, False), (200, True)]


def test_completion_tokens_count_as_they_stream(gw: Gateway, clock: Clock) -> None:
    key = Key(tpm=1000)
    streaming = gw.admit(key, 100)
    clock.advance(1)
    for _ in range(85):
        streaming.completion(10)  # 950 so far, still in flight
    clock.advance(1)
    assert "(950 in the last minute" in gw.refused(key, 51).message
    gw.admit(key, 50)


@pytest.mark.parametrize("real_prompt", [60, 100, 180])
def test_a_prompt_estimate_is_corrected_where_it_was_counted(gw: Gateway, clock: Clock, real_prompt: int) -> None:
    """The gateway admits on an estimate and learns the real count from the answer: the books then agree with
    the usage row, in the minute (where the estimate was counted) and in the day."""
    key = Key(tpm=1000, daily_tokens=1000)
    first = gw.admit(key, 100)
    clock.advance(30)
    first.correct_prompt(real_prompt)
    first.completion(20)
    gw.end(first)
    assert first.tokens == real_prompt + 20
    used = real_prompt + 20
    assert f"({used} in the last minute" in gw.refused(Key(tpm=used), 1).message
    assert f"({used} used today" in gw.refused(Key(daily_tokens=used), 1).message
    clock.advance(2)  # read the log again: its row says the same
    assert f"({used} in the last minute" in gw.refused(Key(tpm=used), 1).message
    assert f"({used} used today" in gw.refused(Key(daily_tokens=used), 1).message
    clock.now = T0 + timedelta(seconds=60)  # the prompt leaves with its admission, the completion stays
    assert "(20 in the last minute" in gw.refused(Key(tpm=20), 1).message


def test_a_stream_that_goes_over_is_not_cut_but_the_next_request_is_refused(gw: Gateway, clock: Clock) -> None:
    key = Key(tpm=1000, daily_tokens=5000)
    stream = gw.admit(key, 100)
    for second in range(30):
        clock.advance(1)
        stream.completion(200)  # past both limits: nothing raises, nothing stops counting
        assert stream.completion_tokens == 200 * (second + 1)
    gw.end(stream)
    assert stream.tokens == 6100
    refused = gw.refused(key, 1)
    assert "(6,100 in the last minute" in refused.message
    # The 6,100 leave the minute as they came in: the prompt at 09:00:00, then 200 a second until 09:00:30.
    assert refused.retry_after_seconds == pytest.approx(60 - 30 + 26)  # 09:00:26's tokens bring it to 900
    clock.now = T0 + timedelta(seconds=86)
    refused = gw.refused(key, 1)
    assert refused.code == "insufficient_quota"  # the minute has room; the day does not


# --- daily and monthly quotas --------------------------------------------------------------------------------


def test_the_daily_quota_refuses_at_the_token(gw: Gateway, log: FakeLog, clock: Clock) -> None:
    key = Key(daily_tokens=10_000)
    log.add("k1", T0 - timedelta(hours=8), tokens=9_000)  # earlier today, another gateway
    log.add("k1", T0 - timedelta(hours=10), tokens=50_000)  # yesterday (UTC): does not count
    gw.request(key, 500, 490)
    gw.request(key, 10)  # 10,000 exactly
    refused = gw.refused(key, 0)
    assert refused.code == "insufficient_quota"
    assert refused.error_type == "rate_limit_error"
    assert refused.retry_after_seconds == 15 * 3600
    assert refused.message == (
        "key 'ci' reached its daily quota of 10,000 tokens (10,000 used today, UTC; this request's prompt is 0); "
        "it resets at 2026-12-01 00:00:00 UTC: retry in 54000 s"
    )


@pytest.mark.parametrize(
    ("now", "period", "resets"),
    [
        (datetime(2026, 11, 30, 23, 59, 59, 500_000, tzinfo=UTC), "daily", datetime(2026, 12, 1, tzinfo=UTC)),
        (datetime(2026, 2, 28, 12, 0, tzinfo=UTC), "daily", datetime(2026, 3, 1, tzinfo=UTC)),
        (datetime(2026, 11, 30, 23, 59, 59, 500_000, tzinfo=UTC), "monthly", datetime(2026, 12, 1, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, 59, 50, tzinfo=UTC), "monthly", datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC), "monthly", datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2028, 2, 29, 8, 0, tzinfo=UTC), "monthly", datetime(2028, 3, 1, tzinfo=UTC)),
    ],
)
def test_quotas_reset_at_utc_midnight_and_on_the_first_of_the_month(
    log: FakeLog, now: datetime, period: str, resets: datetime
) -> None:
    """Refused until the reset, admitted at it, with no wait for the next refresh: a new day asks the log."""
    clock = Clock(now)
    gw = Gateway(log, clock, refresh_seconds=3600)
    key = Key(daily_tokens=1000) if period == "daily" else Key(monthly_tokens=1000)
    gw.request(key, 1000)
    refused = gw.refused(key, 1)
    assert refused.code == "insufficient_quota"
    assert refused.retry_after_seconds == pytest.approx((resets - now).total_seconds())
    assert f"resets at {resets:%Y-%m-%d} 00:00:00 UTC" in refused.message
    clock.now = resets - timedelta(microseconds=1)
    gw.refused(key, 1)
    clock.now = resets
    gw.request(key, 1000)
    gw.refused(key, 1)


def test_a_request_counts_in_the_day_it_was_admitted(gw: Gateway, clock: Clock) -> None:
    """As its usage row does (``memserve usage --by day``): a stream across midnight stays in its first day."""
    clock.now = datetime(2026, 11, 30, 23, 59, 30, tzinfo=UTC)
    key = Key(daily_tokens=1000)
    stream = gw.admit(key, 100)
    clock.now = datetime(2026, 12, 1, 0, 0, 10, tzinfo=UTC)
    stream.completion(500)
    gw.admit(key, 1000)  # the new day is empty: 600 went to the 30th
    gw.end(stream)
    clock.advance(5)
    assert "(1,000 used today" in gw.refused(key, 1).message


def test_the_order_of_checks_is_rpm_tpm_daily_monthly(gw: Gateway, log: FakeLog) -> None:
    """With every limit spent, the refusal names requests per minute; with rpm room, tokens per minute; ..."""
    log.add("k1", T0 - timedelta(days=3), tokens=50)  # earlier this month, not today
    gw.request(Key(rpm=1, tpm=100, daily_tokens=100, monthly_tokens=150), 100)
    assert "requests per minute" in gw.refused(Key(rpm=1, tpm=100, daily_tokens=100, monthly_tokens=150)).message
    assert "tokens per minute" in gw.refused(Key(rpm=2, tpm=100, daily_tokens=100, monthly_tokens=150)).message
    assert "daily quota" in gw.refused(Key(rpm=2, tpm=200, daily_tokens=100, monthly_tokens=150)).message
    assert "monthly quota" in gw.refused(Key(rpm=2, tpm=200, daily_tokens=200, monthly_tokens=150)).message
    gw.admit(Key(rpm=2, tpm=200, daily_tokens=200, monthly_tokens=300))


# --- concurrency ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True])
def test_many_admissions_at_once_respect_the_limit(log: FakeLog, clock: Clock, warm: bool) -> None:
    """100 requests on one loop at once, the first of them fetching the counts (or the counts already fresh)."""
    limiter = Limiter(log, clock=clock)
    key = Key(rpm=60, tpm=50_000)

    async def burst() -> list[Admission | BaseException]:
        if warm:
            (await limiter.admit(key, 0)).done()
            log.rows.append(Row("k1", clock.now, 0))
        return await asyncio.gather(*(limiter.admit(key, 10) for _ in range(100)), return_exceptions=True)

    results = asyncio.run(burst())
    admitted = [r for r in results if isinstance(r, Admission)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == (59 if warm else 60)
    assert len(refused) + len(admitted) == 100
    assert len([q for q in log.queries if q[0] == "requests"]) == 1  # one fetch served them all


def test_concurrent_token_admissions_respect_tpm(log: FakeLog, clock: Clock) -> None:
    limiter = Limiter(log, clock=clock)
    key = Key(tpm=1000)

    async def burst() -> list[Admission | BaseException]:
        return await asyncio.gather(*(limiter.admit(key, 30) for _ in range(50)), return_exceptions=True)

    admitted = [r for r in asyncio.run(burst()) if isinstance(r, Admission)]
    assert sum(a.prompt_tokens for a in admitted) == 990  # 33 × 30


# --- what it costs -------------------------------------------------------------------------------------------


def test_a_key_without_limits_costs_no_query(gw: Gateway, log: FakeLog, clock: Clock) -> None:
    key = Key()
    for _ in range(1000):
        admission = gw.request(key, 10**6, 10**6)
        clock.advance(0.01)
    assert admission.tokens == 2 * 10**6
    assert log.queries == []


@pytest.mark.parametrize(
    ("key", "asked"),
    [
        (Key(rpm=5), [("requests", T0 - timedelta(seconds=60) + timedelta(microseconds=1))]),
        (Key(tpm=5000), [("tokens", T0 - timedelta(seconds=60) + timedelta(microseconds=1))]),
        (Key(daily_tokens=5000), [("tokens", datetime(2026, 11, 30, tzinfo=UTC))]),
        (Key(monthly_tokens=5000), [("tokens", datetime(2026, 11, 1, tzinfo=UTC))]),
    ],
)
def test_one_query_per_limited_window_at_most_every_refresh(
    gw: Gateway, log: FakeLog, clock: Clock, key: Key, asked: list[tuple[str, datetime]]
) -> None:
    for _ in range(4):
        gw.request(key, 10)
        clock.advance(0.5)  # 4 requests in 2 s: one fetch
    assert log.queries == asked
    gw.request(key, 10)
    assert len(log.queries) == 2


# --- several gateways on one log -----------------------------------------------------------------------------


def test_another_gateways_recorded_usage_is_seen_after_a_refresh(log: FakeLog, clock: Clock) -> None:
    a, b = Gateway(log, clock), Gateway(log, clock)
    key = Key(rpm=10)
    for _ in range(6):
        a.request(key)
    clock.advance(0.5)
    for _ in range(4):
        b.request(key)  # B read the log at 09:00:00.5: A's 6 are there, so it stops at 10
    b.refused(key)
    clock.advance(0.5)
    a.request(key)  # A read it at 09:00:00, before B's 4: its count is 7 (the tolerance: up to refresh_seconds)
    clock.advance(1)
    refused = a.refused(key)  # 09:00:02: A reads again and sees all 11
    assert "(11 in the last minute)" in refused.message
    # Two of A's own must leave (09:00:00's, at 09:01:00); B's 4 stay (the log gives no times, and they are
    # newer than that anyway).
    assert refused.retry_after_seconds == pytest.approx(58)
    clock.now = T0 + timedelta(seconds=60)
    a.request(key)


def test_another_gateways_tokens_count_against_the_quota_after_a_refresh(log: FakeLog, clock: Clock) -> None:
    gw = Gateway(log, clock)
    key = Key(monthly_tokens=10_000)
    gw.request(key, 4_000)
    log.add("k1", clock.now, tokens=5_000)
    clock.advance(1)
    gw.request(key, 1_000)  # not seen yet: 5,000 of ours
    clock.advance(1)
    refused = gw.refused(key, 1)  # 10,000 with the other gateway's
    assert "(10,000 used this month" in refused.message


def test_other_gateways_tokens_in_the_minute(log: FakeLog, clock: Clock) -> None:
    gw = Gateway(log, clock)
    key = Key(tpm=1000)
    gw.request(key, 100)
    log.add("k1", clock.now + timedelta(seconds=1), tokens=800)
    clock.advance(2)
    refused = gw.refused(key, 101)
    assert "(900 in the last minute" in refused.message
    assert refused.retry_after_seconds == pytest.approx(58)  # once our 100 leave, at 09:01:00, 101 fit
    # Not when the other gateway's 800 must leave too: the log gives no times, but all it counted at 09:00:02
    # has left by 09:01:02.
    assert gw.refused(key, 201).retry_after_seconds == pytest.approx(60)
    gw.request(key, 100)


# --- a refresh counts nothing twice --------------------------------------------------------------------------


def test_a_refresh_does_not_double_count(gw: Gateway, log: FakeLog, clock: Clock) -> None:
    key = Key(rpm=100, tpm=100_000, daily_tokens=100_000, monthly_tokens=100_000)
    in_flight = [gw.admit(key, 100) for _ in range(3)]  # across every refresh below
    for _ in range(5):
        gw.request(key, 100, 50)
    for step in range(4):
        clock.advance(2)  # each admission below reads the log again
        in_flight[0].completion(10)
        if step == 1:
            gw.end(in_flight[1])
        gw.request(key, 0)
    # 3 + 5 + 4 requests; 300 + 750 + 40 tokens: each counted once, wherever it is
    assert "(12 in the last minute)" in gw.refused(Key(rpm=12, tpm=100_000)).message
    assert "(1,090 in the last minute" in gw.refused(Key(rpm=100, tpm=1090), 1).message
    assert "(1,090 used today" in gw.refused(Key(daily_tokens=1090), 1).message
    assert "(1,090 used this month" in gw.refused(Key(monthly_tokens=1090), 1).message


@pytest.mark.parametrize("in_the_answer", [True, False])
@pytest.mark.parametrize("window", ["rpm", "daily"])
def test_a_request_that_ends_while_the_log_is_read_is_never_missed(
    gw: Gateway, log: FakeLog, clock: Clock, in_the_answer: bool, window: str
) -> None:
    """Its row may or may not be in the answer: it stays in the books until the next read (counted twice at
    worst, for at most refresh_seconds), then once."""
    log.answer_first = not in_the_answer
    key, spent = (Key(rpm=100), Key(rpm=3)) if window == "rpm" else (Key(daily_tokens=10_000), Key(daily_tokens=3))
    first = gw.admit(key, 1)
    clock.advance(2)
    log.during_query.append(lambda: gw.end(first))
    gw.admit(key, 1)
    if in_the_answer:  # 2 requests, 2 tokens, counted as 3 until the next read
        assert "(3 " in gw.refused(spent).message
        counted = 2
    else:  # counted as 2: room for a third
        gw.admit(spent, 0 if window == "rpm" else 1)
        counted = 3
    clock.advance(2)
    exact = Key(rpm=counted) if window == "rpm" else Key(daily_tokens=counted)
    assert f"({counted} " in gw.refused(exact).message


# --- a store that cannot answer ------------------------------------------------------------------------------


def test_the_store_failing_keeps_the_last_counts(
    gw: Gateway, log: FakeLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    key = Key(rpm=3)
    gw.request(key)
    log.fail = True
    clock.advance(2)
    with caplog.at_level(logging.WARNING, logger="memserve.gateway.limits"):
        gw.request(key)
        clock.advance(2)
        gw.request(key)
    assert "limits for key 'ci' use counts from 2026-11-30 09:00:00 UTC" in caplog.text
    assert caplog.text.count("use counts from") == 1  # once per failing streak
    assert "(3 in the last minute)" in gw.refused(key).message


def test_the_store_failing_before_any_count_refuses_with_its_error(gw: Gateway, log: FakeLog) -> None:
    log.fail = True
    with pytest.raises(StoreUnavailable, match="locked"):
        gw.admit(Key(rpm=3))


# --- the tolerance across gateways, in numbers ---------------------------------------------------------------


class BufferedLog:
    """One gateway's usage log on a shared table: its own rows are seen at once (buffered), the others' once
    flushed."""

    def __init__(self, table: list[Row]) -> None:
        self.table = table
        self.buffer: list[Row] = []

    async def requests_since(self, key_id: str, since: datetime) -> int:
        return sum(1 for r in [*self.table, *self.buffer] if r.time >= since)

    async def tokens_since(self, key_id: str, since: datetime) -> int:
        return sum(r.tokens for r in [*self.table, *self.buffer] if r.time >= since)

    def flush(self) -> None:
        self.table.extend(self.buffer)
        self.buffer.clear()


def test_two_gateways_go_past_a_limit_by_at_most_the_others_lag(clock: Clock) -> None:
    """A runaway client sends 5 requests/s to each of 2 gateways, each request lasting 2 s, against 60 per
    minute; rows are flushed every 1 s, the log read every 2 s. Over any minute, at most 60 + what the other
    gateway admitted in the last refresh + flush + request seconds (5 × 5) get through (docs/limits.md)."""
    table: list[Row] = []
    logs = [BufferedLog(table), BufferedLog(table)]
    limiters = [Limiter(log, clock=clock, refresh_seconds=2.0) for log in logs]
    key = Key(rpm=60)
    running: list[tuple[datetime, BufferedLog, Admission]] = []
    admitted: list[datetime] = []

    async def client() -> None:
        for tick in range(120 * 20):  # 120 s in steps of 50 ms
            clock.now = T0 + timedelta(seconds=tick / 20)
            for end, log, admission in [r for r in running if r[0] <= clock.now]:
                admission.done()
                log.buffer.append(Row("k1", admission.admitted_at, admission.tokens))
                running.remove((end, log, admission))
            if tick % 20 == 5:  # flushes 250 ms after the fetches (worst phases are within a request or two)
                for log in logs:
                    log.flush()
            if tick % 4 == 0:  # 5 requests/s to each gateway
                for log, limiter in zip(logs, limiters, strict=True):
                    try:
                        admission = await limiter.admit(key, 0)
                    except RateLimited:
                        continue
                    admitted.append(clock.now)
                    running.append((clock.now + timedelta(seconds=2), log, admission))

    asyncio.run(client())
    most = max(sum(1 for t in admitted if start <= t < start + timedelta(seconds=60)) for start in admitted)
    assert 60 <= most <= 60 + 5 * (2 + 1 + 2)


def test_limits_import_neither_torch_nor_the_store() -> None:
    """The limiter reads the store through its Protocols only, and the gateway never imports torch."""
    code = (
        "import sys, memserve.gateway.limits; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'sqlalchemy') "
        "or m.startswith(('memserve.runner', 'memserve.store', 'memserve.pool'))]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- on the real usage log (SQLite) ----------------------------------------------------------------------------


def test_on_the_store_two_gateways_count_each_request_once(tmp_path: Path) -> None:
    """The Limiter on ``memserve.store``'s UsageLog: its rows in the table and in the buffer, the minute's edge
    at the microsecond, and a second gateway (another Store on the same file) seeing the first's flushed rows."""
    from memserve.store.db import Store
    from memserve.store.usage import UsageRow

    url = f"sqlite+aiosqlite:///{tmp_path / 'memserve.db'}"
    clock = Clock(T0)

    def row(admission: Admission) -> UsageRow:
        return UsageRow(
            time=admission.admitted_at,
            key_id=admission.key_id,
            model="m",
            provider="local",
            endpoint="/v1/completions",
            prompt_tokens=admission.prompt_tokens,
            completion_tokens=admission.completion_tokens,
            duration_seconds=0.1,
            status=200,
        )

    async def scenario() -> None:
        a, b = await Store.open(url), await Store.open(url)
        try:
            key, _ = await a.keys.create("ci", rpm=5, tpm=1000)
            on_a, on_b = Limiter(a.usage, clock=clock), Limiter(b.usage, clock=clock)
            first = await on_a.admit(key, 100)
            first.completion(50)
            first.done()
            a.usage.record(row(first))  # in a's buffer: a counts it, b cannot see it yet
            clock.advance(1)
            in_flight = [await on_b.admit(key, 100)]
            clock.advance(1)
            for _ in range(2):
                admission = await on_a.admit(key, 100)
                admission.done()
                a.usage.record(row(admission))
            await a.usage.flush()  # a's three rows (350 tokens) are in the table
            clock.advance(2)
            with pytest.raises(RateLimited, match=r"\(450 in the last minute; this request's prompt is 600\)"):
                await on_b.admit(key, 600)  # b's 100 in flight and a's 350 from the table
            in_flight.append(await on_b.admit(key, 0))
            with pytest.raises(RateLimited, match=r"\(5 in the last minute\)"):
                await on_b.admit(key, 0)
            # The minute's edge in SQL, read by a gateway with no books: a's rows at 09:00:00 and 09:00:02 (×2).
            three = Key(id=key.id, rpm=3)
            clock.now = T0 + timedelta(seconds=60) - timedelta(microseconds=1)
            with pytest.raises(RateLimited, match=r"\(3 in the last minute\)"):
                await Limiter(b.usage, clock=clock).admit(three, 0)  # 09:00:00's is still in the minute
            clock.now = T0 + timedelta(seconds=60)
            await Limiter(b.usage, clock=clock).admit(three, 0)  # and now it is not
            assert all(not admission.is_done for admission in in_flight)
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())
