"""The question file: one JSON object a line, ``{"id", "prompt" | "messages", "answer"}``.

``prompt`` is a string (sent as one user message) and ``messages`` a chat list, as OpenAI's evals and
most eval sets carry them; ``answer`` is what the scorer compares with (a string, or an object for
``json-field``). Each question becomes one line of an OpenAI batch file, so every model runs through the
batch executor and its checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.errors import InvalidArgument

MAX_PROBLEMS_SHOWN = 10


@dataclass(frozen=True)
class Question:
    id: str
    messages: list[dict[str, Any]]
    answer: Any


def read_questions(path: Path) -> list[Question]:
    """Every question in ``path``; one InvalidArgument naming each bad line (by number) if any is bad."""
    if not path.is_file():
        raise InvalidArgument(f"{path} is not a file; give a .jsonl file of questions", param="questions")
    questions: list[Question] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                problems.append(f"line {number}: not valid JSON ({exc})")
                continue
            problem = _problem(item, seen)
            if problem is not None:
                problems.append(f"line {number}: {problem}")
                continue
            seen[str(item["id"])] = number
            messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
            questions.append(Question(str(item["id"]), messages, item["answer"]))
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f" ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise InvalidArgument(
            f"{path} has {len(problems)} bad line(s): {shown}{more}; each line needs "
            '{"id": ..., "prompt": "..." (or "messages": [...]), "answer": ...}',
            param="questions",
        )
    if not questions:
        raise InvalidArgument(f"{path} has no questions; each line is one JSON question", param="questions")
    return questions


def _problem(item: Any, seen: dict[str, int]) -> str | None:
    if not isinstance(item, dict):
        return "not a JSON object"
    qid = item.get("id")
    if not isinstance(qid, str | int) or isinstance(qid, bool) or str(qid) == "":
        return 'needs "id", a non-empty string or number'
    if str(qid) in seen:
        return f"duplicate id {str(qid)!r} (first on line {seen[str(qid)]})"
    prompt, messages = item.get("prompt"), item.get("messages")
    if (prompt is None) == (messages is None):
        return 'needs either "prompt" (a string) or "messages" (a chat list), not both'
    if prompt is not None and not isinstance(prompt, str):
        return '"prompt" must be a string'
    if messages is not None and not (
        isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)
    ):
        return '"messages" must be a non-empty list of {"role", "content"} objects'
    if "answer" not in item:
        return 'needs "answer", the expected answer'
    return None


def write_batch_input(questions: list[Question], path: Path, *, max_tokens: int) -> None:
    """The questions as an OpenAI batch file (greedy chat requests, the model filled in per run), written
    whole and renamed into place so that a stopped compare never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for q in questions:
            body = {"messages": q.messages, "max_tokens": max_tokens, "temperature": 0}
            line = {"custom_id": q.id, "method": "POST", "url": "/v1/chat/completions", "body": body}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(partial, path)


LETTERS = "etaoinshrdlucmfwypvbgkjqxz"  # English by frequency: some are in most answers, some in few


def make_questions(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """A question set for trying the pipeline on demo models (whose answers are noise): "write a word
    with the letter X", scored with ``contains``. Common letters are in most answers and rare ones in few,
    so each model gets some right and some wrong, and different models differ."""
    if count < 1:
        raise InvalidArgument("--make-questions needs a count of at least 1", param="make_questions")
    rng = random.Random(seed)
    out = []
    for i in range(count):
        letter = rng.choice(LETTERS)
        out.append({"id": f"q{i:05d}", "prompt": f"Write a word with the letter {letter}.", "answer": letter})
    return out


def write_questions(items: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item) + "\n")


__all__ = ["Question", "make_questions", "read_questions", "write_batch_input", "write_questions"]
