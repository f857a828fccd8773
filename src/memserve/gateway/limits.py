"""Per-key limits: requests and tokens per minute, daily and monthly token quotas.

The usage log is the one truth every gateway shares, so a window's count starts from it; what the log cannot
hold yet (requests in flight on this gateway, rows not flushed) is added from this gateway's own books. A
request counts once: either its row was in the log when the count was fetched, or it is in the books.

- **Minute windows** (``rpm``, ``tpm``) slide: a request counts while it was admitted less than 60 s ago, a
  token while it was counted less than 60 s ago (the prompt on admission, the completion as it streams).
  This gateway's own requests and tokens slide exactly; what other gateways did is the log's count at the
  last fetch minus this gateway's own rows in it, held until the next fetch.
- **Quotas** (``daily_tokens``, ``monthly_tokens``) are calendar windows in UTC, as the usage log groups
  them: a request's tokens count in the day and month it was admitted (its usage row's ``time``).

The log is asked at most every ``refresh_seconds`` per key (one query per limited window); a new day or
month asks at once. A stream is never cut: limits are checked on admission only, so a request that goes past
a limit while it streams finishes, and the next one is refused. ``docs/limits.md`` has the whole story and
the tolerance across gateways.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shlex
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from memserve.errors import InvalidArgument, RateLimited, StoreUnavailable

__all__ = ["Admission", "LimitedKey", "Limiter", "UsageCounts"]

log = logging.getLogger(__name__)

MINUTE = timedelta(seconds=60)
# The log is asked for rows at or after ``since``; a minute window is (now - 60 s, now], so the first
# microsecond (the resolution of the log's timestamps) after now - 60 s is where it starts.
_TICK = timedelta(microseconds=1)


class LimitedKey(Protocol):
    """What the limiter reads of an API key (``memserve.store.keys.ApiKey``): None means no limit."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def rpm(self) -> int | None: ...
    @property
    def tpm(self) -> int | None: ...
    @property
    def daily_tokens(self) -> int | None: ...
    @property
    def monthly_tokens(self) -> int | None: ...


class UsageCounts(Protocol):
    """The usage log's counts (``memserve.store.usage.UsageLog``).

    Both count the rows whose ``time`` is at or after ``since``, the rows still buffered included. The
    limiter relies on a row's ``time`` being its request's :attr:`Admission.admitted_at`, and its tokens
    being :attr:`Admission.tokens`, recorded right after :meth:`Admission.done` with no ``await`` between.
    """

    async def tokens_since(self, key_id: str, since: datetime) -> int: ...
    async def requests_since(self, key_id: str, since: datetime) -> int: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


def day_start(now: datetime) -> datetime:
    """Midnight UTC of ``now``'s day."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    """The 1st of ``now``'s month, midnight UTC."""
    return day_start(now).replace(day=1)


def next_month_start(now: datetime) -> datetime:
    start = month_start(now)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


class Admission:
    """One admitted request's tokens, counted against its key's limits until its usage row is in the log."""

    __slots__ = ("_books", "admitted_at", "completion_tokens", "is_done", "key_id", "prompt_tokens")

    def __init__(self, key_id: str, prompt_tokens: int, admitted_at: datetime, books: _Books | None) -> None:
        self.key_id = key_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.admitted_at = admitted_at
        self.is_done = False
        self._books = books

    @property
    def tokens(self) -> int:
        """Prompt and completion tokens so far: what its usage row must say."""
        return self.prompt_tokens + self.completion_tokens

    def completion(self, tokens: int) -> None:
        """``tokens`` more completion tokens streamed: they count against tokens per minute and the quotas
        from now on (never against this request: it is not cut)."""
        if self.is_done or tokens <= 0:
            return
        self.completion_tokens += tokens
        if self._books is not None:
            self._books.count_tokens(self, self._books.clock(), tokens)

    def correct_prompt(self, tokens: int) -> None:
        """The prompt's real token count, once the answer says it, in place of the estimate it was admitted
        with: counted where the estimate was (its minute, its day), so that the books agree with the usage row."""
        if self.is_done or tokens < 0:
            return
        delta, self.prompt_tokens = tokens - self.prompt_tokens, tokens
        if self._books is not None and delta:
            self._books.recount(self, delta)

    def done(self) -> None:
        """The request ended; its usage row is recorded right after (idempotent)."""
        self.is_done = True


@dataclass
class _Fetch:
    """What the log said at ``at`` (when the queries were sent), per window; None where not asked."""

    at: datetime
    others_requests: int | None = None  # other gateways' requests in the minute before ``at``
    others_tokens: int | None = None  # and their tokens
    day: datetime | None = None  # the UTC day's start and end
    day_end: datetime | None = None
    day_tokens: int | None = None
    month: datetime | None = None  # the UTC month's
    month_end: datetime | None = None
    month_tokens: int | None = None


@dataclass
class _Books:
    """One key's books on this gateway. Everything here changes with no ``await`` in between."""

    clock: Callable[[], datetime]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    fetch: _Fetch | None = None
    # This gateway's requests admitted in the last minute, oldest first (for rpm, and for what of the log's
    # minute is this gateway's own).
    recent: deque[Admission] = field(default_factory=deque)
    # This gateway's tokens counted in the last minute: (when, how many), oldest first, and their sum.
    minute_tokens: deque[tuple[datetime, int]] = field(default_factory=deque)
    minute_tokens_total: int = 0
    # Requests whose rows were not in the log at the last fetch (in flight, or ended since), and their tokens
    # in the fetch's day and month (kept as they change: admission checks them without a loop).
    unsettled: list[Admission] = field(default_factory=list)
    unsettled_day_tokens: int = 0
    unsettled_month_tokens: int = 0
    failing: bool = False

    def count_tokens(self, admission: Admission, at: datetime, tokens: int) -> None:
        """``admission``'s ``tokens`` more, counted at ``at`` in the minute and in its day and month."""
        if self.minute_tokens and self.minute_tokens[-1][0] == at:
            self.minute_tokens[-1] = (at, self.minute_tokens[-1][1] + tokens)
        else:
            self.minute_tokens.append((at, tokens))
        self.minute_tokens_total += tokens
        self._count_unsettled(admission, tokens)

    def recount(self, admission: Admission, delta: int) -> None:
        """Correct the tokens ``admission`` counted when it was admitted by ``delta`` (in the minute, only while
        they are still in it)."""
        self._count_unsettled(admission, delta)
        at = admission.admitted_at
        for i in range(len(self.minute_tokens) - 1, -1, -1):
            when, tokens = self.minute_tokens[i]
            if when == at:
                corrected = max(0, tokens + delta)
                self.minute_tokens[i] = (when, corrected)
                self.minute_tokens_total += corrected - tokens
                return
            if when < at:
                return

    def _count_unsettled(self, admission: Admission, tokens: int) -> None:
        if self.fetch is None:
            return
        if self.fetch.day is not None and admission.admitted_at >= self.fetch.day:
            self.unsettled_day_tokens += tokens
        if self.fetch.month is not None and admission.admitted_at >= self.fetch.month:
            self.unsettled_month_tokens += tokens

    def settle(self, fetch: _Fetch, settled: set[int]) -> None:
        """A new fetch: what it has in the log leaves the books; the rest is summed for its day and month."""
        self.fetch = fetch
        self.unsettled = [a for a in self.unsettled if id(a) not in settled]
        self.unsettled_day_tokens = sum(a.tokens for a in self.unsettled if fetch.day and a.admitted_at >= fetch.day)
        self.unsettled_month_tokens = sum(
            a.tokens for a in self.unsettled if fetch.month and a.admitted_at >= fetch.month
        )

    def slide(self, now: datetime) -> None:
        """Forget what left the minute window: a request or token counts while it is less than 60 s old."""
        cutoff = now - MINUTE
        while self.recent and self.recent[0].admitted_at <= cutoff:
            self.recent.popleft()
        while self.minute_tokens and self.minute_tokens[0][0] <= cutoff:
            self.minute_tokens_total -= self.minute_tokens.popleft()[1]


class Limiter:
    """Admits a request for a key, or refuses it with a 429 that says which limit and when it resets.

    One per gateway, on its event loop. Keys with no limits cost nothing: no books, no query.
    """

    def __init__(
        self, usage: UsageCounts, *, clock: Callable[[], datetime] = utc_now, refresh_seconds: float = 2.0
    ) -> None:
        self._usage = usage
        self._clock = clock
        self._refresh = timedelta(seconds=refresh_seconds)
        self._books: dict[str, _Books] = {}

    async def admit(self, key: LimitedKey, prompt_tokens: int) -> Admission:
        """Count a request of ``prompt_tokens`` against ``key``'s limits, in order: requests per minute,
        tokens per minute, daily tokens, monthly tokens. Raises :class:`RateLimited` at the first one it
        would pass, or :class:`InvalidArgument` first (before any query) when its prompt alone is above a whole
        limit: no wait would let it pass."""
        if key.rpm is None and key.tpm is None and key.daily_tokens is None and key.monthly_tokens is None:
            return Admission(key.id, prompt_tokens, self._clock(), None)
        _check_never(key, prompt_tokens)
        books = self._books.get(key.id)
        if books is None:
            books = self._books[key.id] = _Books(self._clock)
        if not _covers(books.fetch, key, self._clock(), self._refresh):
            async with books.lock:  # one fetch per key at a time; the others wait for it, then count
                now = self._clock()
                if not _covers(books.fetch, key, now, self._refresh):
                    await self._refetch(books, key, now)
        # No await from here on: many requests admitted at once are checked and counted one after another.
        now = self._clock()
        books.slide(now)
        fetch = books.fetch
        assert fetch is not None
        _check(key, books, fetch, prompt_tokens, now)
        admission = Admission(key.id, prompt_tokens, now, books)
        books.recent.append(admission)
        books.unsettled.append(admission)
        books.count_tokens(admission, now, prompt_tokens)
        return admission

    async def _refetch(self, books: _Books, key: LimitedKey, now: datetime) -> None:
        """Ask the log for each limited window. What ended before the queries were sent is in the log's answer;
        what ends while they run stays in the books too (counted twice until the next fetch, never missed)."""
        books.slide(now)
        settled = {id(a) for a in books.unsettled if a.is_done}
        own = [a for a in books.recent if a.is_done]  # this gateway's rows in the log's minute
        since = now - MINUTE + _TICK
        fetch = _Fetch(at=now)
        try:
            if key.rpm is not None:
                fetch.others_requests = max(0, await self._usage.requests_since(key.id, since) - len(own))
            if key.tpm is not None:
                own_tokens = sum(a.tokens for a in own)
                fetch.others_tokens = max(0, await self._usage.tokens_since(key.id, since) - own_tokens)
            if key.daily_tokens is not None:
                fetch.day = day_start(now)
                fetch.day_end = fetch.day + timedelta(days=1)
                fetch.day_tokens = await self._usage.tokens_since(key.id, fetch.day)
            if key.monthly_tokens is not None:
                fetch.month = month_start(now)
                fetch.month_end = next_month_start(now)
                fetch.month_tokens = await self._usage.tokens_since(key.id, fetch.month)
        except StoreUnavailable as exc:
            # The last counts plus everything since are still a count that misses nothing of this gateway's:
            # keep serving on them and ask again in refresh_seconds. With none for this window, refuse.
            stale = books.fetch
            if not _covers(stale, key, now, None):
                raise
            assert stale is not None
            if not books.failing:
                log.warning("limits for key %r use counts from %s: %s", key.name, _when(stale.at), exc.message)
            books.failing = True
            stale.at = now
            return
        if books.failing:
            log.warning("limits for key %r read the usage log again", key.name)
            books.failing = False
        books.settle(fetch, settled)


def _covers(fetch: _Fetch | None, key: LimitedKey, now: datetime, refresh: timedelta | None) -> bool:
    """Whether ``fetch`` answers every limited window of ``key`` at ``now`` (and is fresh, given ``refresh``)."""
    if fetch is None or (refresh is not None and not fetch.at <= now < fetch.at + refresh):
        return False
    if key.rpm is not None and fetch.others_requests is None:
        return False
    if key.tpm is not None and fetch.others_tokens is None:
        return False
    if key.daily_tokens is not None and not (fetch.day and fetch.day_end and fetch.day <= now < fetch.day_end):
        return False
    return key.monthly_tokens is None or bool(fetch.month and fetch.month_end and fetch.month <= now < fetch.month_end)


def _check(key: LimitedKey, books: _Books, fetch: _Fetch, prompt_tokens: int, now: datetime) -> None:
    """Raise :class:`RateLimited` for the first limit this request would pass, in the documented order (a prompt
    above a whole limit was refused before, by ``_check_never``: here each prompt fits its limits when empty)."""
    name = key.name
    if key.rpm is not None and fetch.others_requests is not None:
        used = fetch.others_requests + len(books.recent)
        if used + 1 > key.rpm:
            room = key.rpm - 1 - fetch.others_requests  # how many of ours may stay
            times = [a.admitted_at for a in books.recent]
            wait = _minute_wait(times, len(times) - room, fetch, now)
            raise _refused(
                f"key {name!r} reached its limit of {key.rpm:,} requests per minute ({used:,} in the last minute)",
                wait,
                now,
                "rate_limit_exceeded",
            )
    if key.tpm is not None and fetch.others_tokens is not None:
        used = fetch.others_tokens + books.minute_tokens_total
        what = f"its limit of {key.tpm:,} tokens per minute"
        if used + prompt_tokens > key.tpm or used >= key.tpm:
            # how many of our tokens may stay: room for the prompt, and below the limit
            room = min(key.tpm - prompt_tokens, key.tpm - 1) - fetch.others_tokens
            wait = _token_wait(books.minute_tokens, books.minute_tokens_total - room, fetch, now)
            raise _refused(
                f"key {name!r} reached {what} ({used:,} in the last minute; this request's prompt is "
                f"{prompt_tokens:,})",
                wait,
                now,
                "rate_limit_exceeded",
            )
    for quota, logged, ours, period, ends in (
        (
            key.daily_tokens,
            fetch.day_tokens,
            books.unsettled_day_tokens,
            "daily",
            fetch.day_end,
        ),
        (
            key.monthly_tokens,
            fetch.month_tokens,
            books.unsettled_month_tokens,
            "monthly",
            fetch.month_end,
        ),
    ):
        if quota is None or logged is None or ends is None:
            continue
        wait = (ends - now).total_seconds()
        what = f"its {period} quota of {quota:,} tokens"
        used = logged + ours
        if used + prompt_tokens > quota or used >= quota:
            today = "today" if period == "daily" else "this month"
            raise _refused(
                f"key {name!r} reached {what} ({used:,} used {today}, UTC; this request's prompt is {prompt_tokens:,})",
                wait,
                now,
                "insufficient_quota",
            )


def _minute_wait(times: list[datetime], leave: int, fetch: _Fetch, now: datetime) -> float:
    """Seconds until ``leave`` of this gateway's oldest ``times`` have left the minute window; when that is not
    enough (other gateways' counts, which the log gives without times), until all that is counted now has."""
    if 0 < leave <= len(times):
        return (times[leave - 1] + MINUTE - now).total_seconds()
    newest = max([fetch.at, *times[-1:]])
    return (newest + MINUTE - now).total_seconds()


def _token_wait(events: deque[tuple[datetime, int]], leave: int, fetch: _Fetch, now: datetime) -> float:
    """Seconds until ``leave`` of this gateway's tokens of the last minute have left it (oldest first)."""
    if leave > 0:
        gone = 0
        for at, tokens in events:
            gone += tokens
            if gone >= leave:
                return (at + MINUTE - now).total_seconds()
    return _minute_wait([at for at, _ in events], -1, fetch, now)


def _refused(what: str, wait_seconds: float, now: datetime, code: str) -> RateLimited:
    wait_seconds = max(wait_seconds, 0.0)
    resets = now + timedelta(seconds=wait_seconds)
    return RateLimited(
        f"{what}; it resets at {_when(resets)}: retry in {_seconds(wait_seconds)} s",
        retry_after_seconds=wait_seconds,
        code=code,
    )


def _check_never(key: LimitedKey, prompt_tokens: int) -> None:
    for limit, what, flag in (
        (key.tpm, "its limit of {:,} tokens per minute", "--tpm"),
        (key.daily_tokens, "its daily quota of {:,} tokens", "--daily-tokens"),
        (key.monthly_tokens, "its monthly quota of {:,} tokens", "--monthly-tokens"),
    ):
        if limit is not None and prompt_tokens > limit:
            raise _never(key.name, what.format(limit), prompt_tokens, flag)


def _never(name: str, what: str, prompt_tokens: int, flag: str) -> InvalidArgument:
    """A prompt larger than a whole limit passes after no wait: a 400, as a prompt longer than the context is,
    not a 429 whose Retry-After (and status: the openai client retries any 429) would invite retries that can
    only fail. The code still names the kind of limit. docs/limits.md compares OpenAI's and LiteLLM's answers."""
    code = "rate_limit_exceeded" if flag == "--tpm" else "insufficient_quota"
    return InvalidArgument(
        f"key {name!r} has {what}, and this request's prompt alone is {prompt_tokens:,} tokens: it can never "
        f"pass, however long it waits; shorten the prompt, or ask an admin to raise the key's limit "
        f"(memserve keys update {shlex.quote(name)} {flag} N)",
        code=code,
    )


def _seconds(seconds: float) -> int:
    """Whole seconds, rounded up, at least 1: what ``Retry-After`` says (``wire.format.retry_after``)."""
    return max(1, math.ceil(seconds))


def _when(at: datetime) -> str:
    """A UTC time to the second, rounded up (a reset is never announced before it happens)."""
    at = at.astimezone(UTC)
    if at.microsecond:
        at = at.replace(microsecond=0) + timedelta(seconds=1)
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")
