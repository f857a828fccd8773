"""One generation request as the gateway meters it: the log line, the usage row, the key's limits.

``_HotRoutes`` makes a ``RequestRecord`` per generation request and shows it every message of the answer
(``see``); the handler fills in who asked and where it went; ``finish`` runs once however the request ended
(finished, failed, or the client gone) and writes one usage row off the request path (``UsageLog.record``
only appends to a buffer). Tokens come from the answer's own ``usage`` (a stream asks its upstream for it,
see ``metered``); a stream cut short is metered by the text events the client received. ``finish`` also
counts the request in ``/metrics`` (``gateway/metrics.py``), and a stream's text events are timed as they
pass (``text_seen``) for its inter-token latency.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from memserve.errors import MemserveError
from memserve.gateway.auth import Caller
from memserve.gateway.limits import Admission, Limiter
from memserve.gateway.upstream import StreamUsage, WholeAnswer
from memserve.logs import FIELDS
from memserve.store.usage import UsageLog, UsageRow
from memserve.tally import ITL_BUCKETS, Labels, Tally
from memserve.wire.http import error_response

if TYPE_CHECKING:
    from memserve.gateway.metrics import RequestMetrics

log = logging.getLogger("memserve.gateway.app")

CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads it, the client is gone


@dataclass
class RequestRecord:
    """One generation request as the log line and the usage row say it; filled in as the answer goes out."""

    path: str
    started: float  # monotonic
    caller: Caller | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))  # the usage row's time
    model: str | None = None
    user: str | None = None
    provider: str = "local"
    fallback: bool = False
    meter: StreamUsage | None = None
    admission: Admission | None = None
    admitted: bool = False  # passed the door, the key's models and its limits: it spends the key's limits
    prompt_estimate: int = 0
    status: int | None = None
    first_byte: float | None = None
    chunks: int = 0
    complete: bool = False  # the answer's last body message went out
    stream_error: str | None = None  # the code of an error event sent in a stream (upstream, broken, timed out)
    json_body: bytes = b""
    answer: dict[str, Any] | None = None  # a whole answer as the upstream's relay parsed it (``WholeAnswer``)
    fallback_code: str | None = None  # the error code that sent a local model's request to its fallback
    queue_seconds: float | None = None  # waited for a lease on a local model's runner
    first_text: float | None = None  # monotonic: the first and last stream chunks that carried text
    last_text: float | None = None
    gaps: Tally | None = None  # the stream's seconds between text events, per event
    in_flight: Labels | None = None  # where /metrics counts it in flight (RequestMetrics.begin)

    def text_seen(self, texts: int) -> None:
        """A relayed chunk carried ``texts`` text events: the gap since the last such chunk, shared among them,
        is each one's inter-token latency. A few operations per chunk, on the request's own tally."""
        now = time.monotonic()
        if self.last_text is None:
            self.first_text = now
        else:
            if self.gaps is None:
                self.gaps = Tally(ITL_BUCKETS)
            self.gaps.observe((now - self.last_text) / texts, texts)
        self.last_text = now

    async def admit(self, limiter: Limiter | None, body: dict[str, Any]) -> None:
        """Count the request against its key's limits (RateLimited, 429, when over one; InvalidArgument, 400,
        when its prompt alone is over a whole limit); the prompt is counted by its estimate now and corrected
        by the real count when the answer says it."""
        key = self.caller.key if self.caller is not None else None
        self.prompt_estimate = _prompt_estimate(body)  # also what a stream cut short is metered with
        if limiter is not None and key is not None:
            self.admission = await limiter.admit(key, self.prompt_estimate)
        self.admitted = True

    def see(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            return
        if message["type"] != "http.response.body":
            return
        self.complete = self.complete or not message.get("more_body")
        if not message.get("body"):
            return
        self.chunks += 1
        if self.first_byte is None:
            self.first_byte = time.monotonic()
        if self.chunks == 1 and not message.get("more_body"):  # a whole JSON answer: its usage, or its error
            self.json_body = message["body"]
        elif _ERROR_EVENT in message["body"]:
            self.stream_error = self.stream_error or _error_code(message["body"])

    def finish(self, usage_log: UsageLog | None, metrics: RequestMetrics | None = None) -> None:
        """Log the request's line and record its usage row; count its tokens against the key's limits and the
        request in ``/metrics``."""
        duration = time.monotonic() - self.started
        answer: dict[str, Any] = {}
        if self.json_body:  # the whole answer the client got: parsed by the relay already when it came from upstream
            answer = self.answer if self.answer is not None else _json_object(self.json_body)
        usage = (self.meter.usage if self.meter is not None else None) or answer.get("usage") or {}
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        if not usage and self.meter is not None:  # a stream cut short: what the client got, and its prompt
            completion, prompt = self.meter.text_events, self.prompt_estimate
        streamed = self.chunks > 1 or self.meter is not None
        ttft = self.first_byte - self.started if streamed and self.first_byte is not None else None
        gone = self.status in (None, CLIENT_CLOSED_REQUEST) or not self.complete  # the client left first
        status = CLIENT_CLOSED_REQUEST if gone or self.status is None else self.status
        error = answer.get("error") if isinstance(answer.get("error"), dict) else None
        error_type = (
            (str(error.get("code") or error.get("type")) if error else None)
            or self.stream_error
            or ("client_closed" if gone else None)
        )
        if self.admission is not None:  # the limiter's books then agree with the usage row
            self.admission.correct_prompt(prompt)
            self.admission.completion(completion - self.admission.completion_tokens)  # the rest of what streamed
            self.admission.done()
        key = self.caller.key if self.caller is not None else None
        row = UsageRow(
            time=self.admission.admitted_at if self.admission is not None else self.started_at,
            key_id=key.id if key is not None else None,
            key_name=self.caller.name if self.caller is not None else None,
            end_user=self.user,
            model=self.model or "",
            provider=self.provider,
            endpoint=self.path,
            prompt_tokens=prompt,
            completion_tokens=completion,
            ttft_seconds=ttft,
            duration_seconds=duration,
            status=status,
            error_type=error_type,
            fallback=self.fallback,
            admitted=self.admitted,
        )
        if usage_log is not None:  # every request, whatever became of it
            usage_log.record(row)
        if metrics is not None:
            metrics.request_done(
                self,
                status=status,
                code=error_type,
                prompt_tokens=prompt,
                completion_tokens=completion,
                ttft_seconds=ttft,
                duration_seconds=duration,
            )
        if not log.isEnabledFor(logging.INFO):
            return
        tokens = f"prompt_tokens={prompt} completion_tokens={completion}" if usage else f"chunks={self.chunks}"
        if ttft is not None:
            tokens += f" ttft={ttft:.3f}s"
        fields = {  # the JSON log's fields: the usage row's, but the end user's id (it is in the usage rows)
            "endpoint": self.path,
            "model": row.model,
            "provider": row.provider,
            "key": row.key_name,
            "status": status,
            "error_type": error_type,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "ttft_seconds": ttft,
            "duration_seconds": duration,
            "fallback": self.fallback,
        }
        log.info(
            "POST %s model=%s%s status=%s %s duration=%.3fs",
            self.path,
            self.model or "-",
            f" key={row.key_name}" if row.key_name else "",
            self.status if self.status is not None else "none (client gone)",
            tokens,
            duration,
            extra={FIELDS: fields},
        )


class Meters(Protocol):
    """Where a finished request is counted (the gateway's ``Service``); read when it finishes."""

    usage: UsageLog | None
    metrics: RequestMetrics | None


async def answer_metered(
    handler: Callable[[Request], Awaitable[Response]],
    scope: Scope,
    receive: Receive,
    send: Send,
    meters: Meters,
    *,
    what: str,
) -> None:
    """Answer one generation request with ``handler``, seen message by message by its ``RequestRecord`` (made
    here, as ``scope["state"]["record"]``, for the caller in ``scope["state"]["caller"]``): one usage row and
    one count in ``/metrics`` however it ends, a cancel (a shutdown past its grace) included. A client's
    request (``_HotRoutes``) and a batch job's (``gateway/batch_jobs.py``) both come through here. ``what``
    names the request in the log when the handler has a bug."""
    state = scope["state"]
    record = state["record"] = RequestRecord(scope["path"], time.monotonic(), caller=state["caller"])

    async def recorded(message: Message) -> None:
        record.see(message)
        await send(message)

    try:
        try:
            response = await handler(Request(scope, receive))
        except Exception as exc:
            if not isinstance(exc, MemserveError):
                log.exception("internal error in %s", what)  # a bug: keep its traceback
            response = error_response(exc)
        if isinstance(response, WholeAnswer) and isinstance(response.payload, dict):
            record.answer = response.payload
        await response(scope, receive, recorded)
    finally:
        record.finish(meters.usage, meters.metrics)


def metered(
    body: dict[str, Any],
    stream: bool,
    admission: Admission | None = None,
    *,
    ask: bool = True,
    record: RequestRecord | None = None,
) -> tuple[dict[str, Any], StreamUsage | None]:
    """The body to send upstream and the meter of its stream: a stream asks for ``include_usage`` so that
    its tokens are metered exactly; the usage chunk is dropped again when the client did not ask for it. A
    key's ``admission`` hears of the completion's tokens as they stream. ``ask`` false (a provider that rejects
    ``stream_options``): the body goes as it is, and the stream is metered by its text events. ``record`` hears
    of them too (``text_seen``: inter-token latency)."""
    if not stream:
        return body, None
    on_text = _both(admission.completion if admission is not None else None, record.text_seen if record else None)
    options = body.get("stream_options")
    if not ask or (options is not None and not isinstance(options, dict)):
        return body, StreamUsage(strip=False, on_text=on_text)  # the upstream judges it; metered by text events
    if (options or {}).get("include_usage") is True:
        return body, StreamUsage(strip=False, on_text=on_text)
    included = {**body, "stream_options": {**(options or {}), "include_usage": True}}
    return included, StreamUsage(strip=True, on_text=on_text)


def _both(first: Callable[[int], None] | None, second: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """One ``on_text`` hook that calls both (either may be None)."""
    if first is None or second is None:
        return first or second

    def both(texts: int) -> None:
        first(texts)
        second(texts)

    return both


def _prompt_estimate(body: dict[str, Any]) -> int:
    """The prompt's tokens before anyone tokenized it: exact for token ids, else its text's characters / 4 (the
    usual rule for English; the answer's own count corrects it). Only text counts: an image's base64 is not
    its tokens."""
    prompt = body.get("prompt", body.get("input"))  # completions' prompt, or an encoder's input
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):  # lists of token ids
        return sum(len(p) for p in prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    if isinstance(prompt, list):
        return sum(len(p) for p in prompt if isinstance(p, str)) // 4 + 1
    characters = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            characters += len(content)
        elif isinstance(content, list):
            characters += sum(
                len(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
    return characters // 4 + 1


_ERROR_EVENT = b'data: {"error"'
_MAX_COUNT = 2**31 - 1  # the usage columns' range: an upstream's absurd count must not stop every write


def _error_code(body: bytes) -> str:
    """The ``code`` (else ``type``) of the first error event in ``body``; ``stream_error`` if unreadable."""
    start = body.index(_ERROR_EVENT) + len(b"data: ")
    line = body[start:].split(b"\n", 1)[0]
    error = _json_object(line).get("error")
    code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    return str(code) if code else "stream_error"


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return min(value, _MAX_COUNT) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


__all__ = ["CLIENT_CLOSED_REQUEST", "Meters", "RequestRecord", "answer_metered", "metered"]
