"""Scorers: pure functions ``(output text, expected answer) -> bool``, named on the command line.

A scorer sees the model's text and the question's ``answer`` as the file holds it (a string, or for
``json-field`` an object); it never sees the model or the clock, so it is tested as a table.
``module:function`` names a user's callable of the same shape.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from typing import Any

from memserve.errors import InvalidArgument

Scorer = Callable[[str, Any], bool]


def exact(output: str, expected: Any) -> bool:
    """The whole answer, surrounding whitespace aside."""
    return output.strip() == str(expected).strip()


def contains(output: str, expected: Any) -> bool:
    """The expected text anywhere in the answer, ignoring case (a chatty model is not penalised)."""
    return str(expected).strip().casefold() in output.casefold()


def regex(output: str, expected: Any) -> bool:
    """The expected answer is a regular expression that must match somewhere in the answer."""
    return re.search(str(expected), output) is not None


_CHOSEN = re.compile(r"answer\s*(?:is|:)?\s*\(?([A-Za-z])\)?(?![A-Za-z])", re.IGNORECASE)
_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def choice(output: str, expected: Any) -> bool:
    """A multiple-choice letter: the one after "answer is"/"answer:", else the first standalone capital
    letter (``B``, ``(B)``, ``B.``), compared with the expected letter, ignoring case."""
    found = _CHOSEN.search(output) or _LETTER.search(output)
    return found is not None and found.group(1).upper() == str(expected).strip().upper()


def json_field(output: str, expected: Any) -> bool:
    """The first JSON object in the answer has every field of the expected object, with equal values."""
    if not isinstance(expected, dict):
        return False
    start = output.find("{")
    decoder = json.JSONDecoder()
    while start != -1:
        try:
            found, _ = decoder.raw_decode(output, start)
        except json.JSONDecodeError:
            start = output.find("{", start + 1)
            continue
        return isinstance(found, dict) and all(k in found and found[k] == v for k, v in expected.items())
    return False


SCORERS: dict[str, Scorer] = {
    "exact": exact,
    "contains": contains,
    "regex": regex,
    "choice": choice,
    "json-field": json_field,
}


def load_scorer(name: str) -> Scorer:
    """A built-in scorer by name, or ``module:function`` imported (the module must be importable)."""
    if name in SCORERS:
        return SCORERS[name]
    module_name, colon, attribute = name.partition(":")
    if not colon or not module_name or not attribute:
        raise InvalidArgument(
            f"unknown scorer {name!r}; use one of {', '.join(SCORERS)} or module:function (a callable "
            "taking the answer text and the expected answer, returning a bool)",
            param="scorer",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(
            f"cannot import {module_name!r} for scorer {name!r} ({exc}); run from the folder that holds it or "
            "add it to PYTHONPATH",
            param="scorer",
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise InvalidArgument(f"{module_name} has no callable {attribute!r}; name a function", param="scorer")
    scorer: Scorer = function
    return scorer


__all__ = ["SCORERS", "Scorer", "choice", "contains", "exact", "json_field", "load_scorer", "regex"]
