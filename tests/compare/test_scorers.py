"""The scorers as a table, and ``module:function`` loading."""

from __future__ import annotations

from typing import Any

import pytest

from memserve.compare.scorers import SCORERS, load_scorer
from memserve.errors import InvalidArgument

CASES = [
    ("exact", "  Paris\n", "Paris", True),
    ("exact", "Paris.", "Paris", False),
    ("exact", "paris", "Paris", False),
    ("contains", "The capital is PARIS.", "paris", True),
    ("contains", "The capital is Lyon.", "Paris", False),
    ("contains", "42", 42, True),
    ("regex", "it costs $12.50", r"\$\d+\.\d\d", True),
    ("regex", "it costs twelve", r"\$\d+", False),
    ("choice", "B", "B", True),
    ("choice", "(c) because ...", "C", False),  # a lower-case (c) is not a standalone capital letter
    ("choice", "The answer is (c).", "C", True),
    ("choice", "Answer: D", "d", True),
    ("choice", "A seems wrong, so B.", "A", True),  # the first standalone capital letter
    ("choice", "I think B", "B", False),  # "I" is a standalone capital first: choice is a crude reader
    ("choice", "no letter here", "A", False),
    ("json-field", 'Sure: {"city": "Paris", "pop": 2} ok', {"city": "Paris"}, True),
    ("json-field", '{"city": "Lyon"}', {"city": "Paris"}, False),
    ("json-field", '{bad} then {"city": "Paris"}', {"city": "Paris"}, True),
    ("json-field", "no json", {"city": "Paris"}, False),
    ("json-field", '{"city": "Paris"}', "Paris", False),  # the expected answer must be an object
]


@pytest.mark.parametrize(("name", "output", "expected", "correct"), CASES)
def test_scorer_table(name: str, output: str, expected: Any, correct: bool) -> None:
    assert SCORERS[name](output, expected) is correct


def test_every_builtin_scorer_is_in_the_table() -> None:
    assert {case[0] for case in CASES} == set(SCORERS)


def test_module_function_is_loaded() -> None:
    scorer = load_scorer("tests.compare.test_scorers:always_right")
    assert scorer("anything", "else") is True


def always_right(output: str, expected: Any) -> bool:
    return True


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("nonsense", "unknown scorer 'nonsense'; use one of exact, contains"),
        ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
        ("tests.compare.test_scorers:missing", "has no callable 'missing'"),
    ],
)
def test_bad_scorer_names_say_what_to_give(name: str, said: str) -> None:
    with pytest.raises(InvalidArgument, match=said.replace("(", r"\(")):
        load_scorer(name)
