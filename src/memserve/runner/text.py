"""From token ids to the text a client sees: incremental detokenization and stop strings.

Byte-level tokenizers split one character over several tokens and merge text across token
boundaries, so ``decode(ids[:n+1])`` is not ``decode(ids[:n]) + decode(ids[n])``. The detokenizer
decodes a short window ending at the newest token and emits what it adds to the previous decode of
that window (the scheme vLLM and TGI use: the same text as decoding the whole completion each time,
without the quadratic cost); text ending in U+FFFD, an incomplete UTF-8 sequence, waits for the next
token. Stop strings are matched on that text; while streaming, a tail that could still grow into a
stop string is held back so a client never sees part of one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memserve.wire.events import TokenEvent
from memserve.wire.schema import FinishReason

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IncrementalDetokenizer", "StopStrings", "TextPiece", "text_pieces"]

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a completion's token ids into text one id at a time (special tokens are skipped)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window to decode starts here
        self._read_offset = 0  # text up to here has been emitted

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _pending(self) -> tuple[str, str]:
        """The window's text before the unread tokens, and with them."""
        window = self._ids[self._prefix_offset :]
        return self._decode(window[: self._read_offset - self._prefix_offset]), self._decode(window)

    def add(self, token_id: int) -> str:
        """Add one id; return the text that became final (may be empty)."""
        self._ids.append(token_id)
        before, after = self._pending()
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character stays U+FFFD); call once at the end."""
        before, after = self._pending()
        self._prefix_offset = self._read_offset = len(self._ids)
        return after[len(before) :]


class StopStrings:
    """Cuts the text before the first stop string and holds back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return the text safe to emit and whether a stop string was hit (then nothing follows)."""
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back tail, once no more text will come."""
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best


@dataclass(frozen=True)
class TextPiece:
    """Text that became final; the last piece of a completion carries ``finish_reason``."""

    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0  # tokens generated so far, the one that ended a stop string included


async def text_pieces(
    events: AsyncIterable[TokenEvent], detokenizer: IncrementalDetokenizer, stops: StopStrings
) -> AsyncGenerator[TextPiece, None]:
    """Turn token events into text pieces, ending after the first finish (always with a finish_reason).

    It stops reading ``events`` at a stop string but does not close them: their owner must, at once.
    """
    count = 0
    async for event in events:
        count += 1
        text, stopped = stops.feed(detokenizer.add(event.token_id))
        if stopped:
            yield TextPiece(text, "stop", count)
            return
        if event.finish_reason is not None:
            yield _last_piece(text, detokenizer, stops, event.finish_reason, count)
            return
        if text:
            yield TextPiece(text, None, count)
    # the engine ended without saying why: that is an end of sequence
    yield _last_piece("", detokenizer, stops, "stop", count)


def _last_piece(
    text: str, detokenizer: IncrementalDetokenizer, stops: StopStrings, finish_reason: FinishReason, count: int
) -> TextPiece:
    tail, stopped = stops.feed(detokenizer.flush())
    if stopped:
        return TextPiece(text + tail, "stop", count)
    return TextPiece(text + tail + stops.flush(), finish_reason, count)
