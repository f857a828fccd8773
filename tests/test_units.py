"""parse_seconds: Ollama-style durations, bare seconds, and -1 meaning forever."""

from __future__ import annotations

import math

import pytest

from memserve.errors import InvalidArgument
from memserve.units import parse_seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (300, 300.0),
        (0, 0.0),
        (2.5, 2.5),
        ("300", 300.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("300ms", 0.3),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("1.5h", 5400.0),
        ("250us", 250e-6),
        ("10ns", 10e-9),
        (" 5m ", 300.0),
        ("+30s", 30.0),
        ("-0", 0.0),
    ],
)
def test_parse_seconds_reads_numbers_and_durations(text: str | int | float, seconds: float) -> None:
    assert parse_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [-1, -0.5, "-1", "-1m", "-1h30m", -math.inf])
def test_negative_means_forever(text: str | int | float) -> None:
    assert parse_seconds(text) == math.inf


def test_zero_is_zero_not_forever() -> None:
    assert parse_seconds("-0") == 0.0
    assert math.copysign(1.0, parse_seconds("-0")) == 1.0


@pytest.mark.parametrize(
    "text", ["", "  ", "5 minutes", "5min", "1d", "m", "1h-30m", "1..5s", "abc", "5m30", "nan", math.nan, True]
)
def test_parse_seconds_rejects_other_text_with_the_accepted_forms(text: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_seconds(text, what="keep_alive")  # type: ignore[arg-type]
    message = info.value.message
    assert message.startswith(f"cannot read keep_alive {text!r}")
    assert "5m" in message and "-1 means forever" in message
    assert "\n" not in message
