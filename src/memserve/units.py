"""Byte sizes and durations: the one place where human units are parsed and printed.

Everything inside memserve counts plain bytes (names end in ``_bytes``). Binary units (KiB, MiB,
GiB, TiB) are powers of 1024; decimal units (KB, MB, GB, TB) are powers of 1000; a bare number is
bytes. ``16G`` and ``16g`` are read as GiB, the way ``docker --memory`` and ``ollama`` users write it.
Durations are seconds (names end in ``_seconds``), read from Ollama-style strings by ``parse_seconds``.
"""

from __future__ import annotations

import math
import re

from memserve.errors import InvalidArgument

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int, *, what: str = "size") -> int:
    """``"16GiB"`` → 17179869184. Raises InvalidArgument with the accepted forms."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"{what} must not be negative, got {text}")
        return text
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InvalidArgument(
            f"cannot read {what} {text!r}: expected a number of bytes with an optional unit, "
            "e.g. 123456789, 512MiB, 16GiB or 20GB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: int | float) -> str:
    """17179869184 → ``"16.0 GiB"``; always binary units, one decimal."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    return f"{sign}{value:.1f} TiB"


def parse_device_sizes(text: str, *, what: str = "--memory") -> dict[str, int]:
    """``"cpu=16GiB,cuda:0=20GiB"`` → ``{"cpu": ..., "cuda:0": ...}``.

    A bare size without ``device=`` applies to every device and is returned under ``"*"``.
    """
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        device, sep, size = part.partition("=")
        if not sep:
            device, size = "*", part
        device = device.strip().lower()
        if device != "*" and not re.fullmatch(r"cpu|cuda:\d+", device):
            raise InvalidArgument(
                f"{what}: unknown device {device!r}; expected cpu or cuda:N, e.g. cpu=16GiB,cuda:0=20GiB"
            )
        sizes[device] = parse_bytes(size, what=f"{what} size for {device}")
    if not sizes:
        raise InvalidArgument(f"{what} is empty; expected e.g. cpu=16GiB,cuda:0=20GiB")
    return sizes


_DURATION_UNITS_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_DURATION = re.compile(r"^([+-]?)((?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_seconds(text: str | int | float, *, what: str = "duration") -> float:
    """``"1h30m"`` → 5400.0, ``300`` → 300.0, ``-1`` → ``math.inf`` (forever).

    Durations are written the way Ollama's ``keep_alive`` takes them (Go's ``time.ParseDuration``: ns, us,
    ms, s, m, h, combinable as in ``1h30m``); a bare number is seconds. Any negative value means forever,
    because that is what ``keep_alive: -1`` means to Ollama users. Raises InvalidArgument otherwise.
    """
    expected = "expected seconds (e.g. 300) or a duration such as 300ms, 30s, 5m, 1h or 1h30m; -1 means forever"
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise InvalidArgument(f"cannot read {what} {text!r}: {expected}")
    if isinstance(text, str):
        seconds = _seconds_from_text(text.strip())
        if seconds is None:
            raise InvalidArgument(f"cannot read {what} {text!r}: {expected}")
    else:
        seconds = float(text)
    if math.isnan(seconds):
        raise InvalidArgument(f"cannot read {what} {text!r}: {expected}")
    return math.inf if seconds < 0 else abs(seconds)  # abs: -0 is zero, not forever


def _seconds_from_text(text: str) -> float | None:
    """Seconds written as a bare number or a Go-style duration; None when it is neither."""
    if _NUMBER.match(text):
        return float(text)
    match = _DURATION.match(text)
    if match is None:
        return None
    seconds = sum(float(number) * _DURATION_UNITS_SECONDS[unit] for number, unit in _DURATION_PART.findall(match[2]))
    return -seconds if match[1] == "-" else seconds


_PERIOD = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(d|w)$")


def parse_period(text: str, *, what: str = "period") -> float:
    """Seconds of a period written for people: ``30d``, ``2w``, or any duration ``parse_seconds`` reads
    (``12h``, ``90m``, ``3600``). Never negative, never forever: InvalidArgument otherwise."""
    match = _PERIOD.match(text.strip()) if isinstance(text, str) else None
    if match is not None:
        return float(match[1]) * (86400.0 if match[2] == "d" else 7 * 86400.0)
    expected = "expected e.g. 30d, 2w, 12h or 3600 (seconds)"
    try:
        seconds = parse_seconds(text, what=what)
    except InvalidArgument:
        raise InvalidArgument(f"cannot read {what} {text!r}: {expected}") from None
    if math.isinf(seconds):
        raise InvalidArgument(f"{what} cannot be negative or forever: {expected}")
    return seconds
