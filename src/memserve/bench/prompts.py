"""The prompts a benchmark sends: from a dataset, cut to length by the model's tokenizer, or synthetic words.

Request ``i`` of step ``s`` gets the same prompt for every target, so ``--vs`` compares like with like.
Synthetic prompts differ between requests and steps (seeded by ``--seed``), so a server's prefix cache
cannot answer a later step from an earlier one. A dataset is replayed from its first line in every step.

Without a local tokenizer the prompt length is only approximate (about one token per word); the report
then takes prompt tokens from the server's ``usage.prompt_tokens``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from memserve.errors import InvalidArgument

__all__ = [
    "DatasetPrompts",
    "Prompt",
    "PromptSource",
    "SyntheticPrompts",
    "TextTokenizer",
    "find_tokenizer",
    "load_tokenizer",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when what if will more no out so said can who about "
    "up them some could him into its then two time like other only my than first new these may any over also "
    "after way many must before through back years where much your well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since against go came "
    "right used take three small water river light house memory model server token stream number table garden"
)
_WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class Prompt:
    """One request's input: chat ``messages`` or a completion ``text``, and the tokens to ask for."""

    max_tokens: int
    text: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    prompt_tokens: int | None = None
    """Counted by the local tokenizer, when there is one (the chat template's tokens are not included)."""

    def chat_messages(self) -> list[dict[str, Any]]:
        return list(self.messages) if self.messages is not None else [{"role": "user", "content": self.text or ""}]


class PromptSource(Protocol):
    """Gives request ``request_index`` of step ``step_index`` its prompt."""

    def prompt(self, step_index: int, request_index: int) -> Prompt: ...

    def describe(self) -> dict[str, Any]:
        """What the prompts are, for the JSON report."""
        ...


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class _FastTokenizer:
    """A ``tokenizer.json`` read by the ``tokenizers`` library: no transformers, no torch."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids))


class _AutoTokenizer:
    """Any other tokenizer through ``transformers.AutoTokenizer`` (imported only here)."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids))


def find_tokenizer(model: str, tokenizer: Path | None) -> Path | None:
    """``--tokenizer`` if given, else ``--model`` when it is a local folder with tokenizer files, else None."""
    if tokenizer is not None:
        return tokenizer
    folder = Path(model).expanduser()
    if folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return folder
    return None


def load_tokenizer(path: Path) -> TextTokenizer:
    """A tokenizer from a ``tokenizer.json`` file or a folder holding one (or any transformers tokenizer)."""
    path = path.expanduser()
    if path.is_file():
        return _FastTokenizer(path)
    if (path / "tokenizer.json").is_file():
        return _FastTokenizer(path / "tokenizer.json")
    if path.is_dir():
        try:
            return _AutoTokenizer(path)
        except Exception as exc:  # transformers raises many kinds here; all mean the same to the user
            raise InvalidArgument(
                f"cannot load a tokenizer from {path} ({type(exc).__name__}: {exc}); "
                "pass --tokenizer with a folder or tokenizer.json file"
            ) from exc
    raise InvalidArgument(f"--tokenizer {path}: no such file or folder; pass a folder with tokenizer.json")


class SyntheticPrompts:
    """Seeded random words; cut to ``prompt_tokens`` tokens when a tokenizer is given.

    Decoding the cut ids and encoding the text again can differ by a token at the cut, so the prompt
    carries the count of the text actually sent.
    """

    def __init__(
        self,
        *,
        prompt_tokens: int,
        output_tokens: int,
        seed: int,
        tokenizer: TextTokenizer | None = None,
        tokenizer_path: Path | None = None,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.seed = seed
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path

    def prompt(self, step_index: int, request_index: int) -> Prompt:
        rng = random.Random(f"{self.seed}:{step_index}:{request_index}")
        if self.tokenizer is None:
            text = " ".join(rng.choice(_WORDS) for _ in range(self.prompt_tokens))
            return Prompt(max_tokens=self.output_tokens, text=text)
        # words split into several tokens at times, so ask for more words than tokens and cut the ids
        words = " ".join(rng.choice(_WORDS) for _ in range(self.prompt_tokens + 16))
        text = self.tokenizer.decode(self.tokenizer.encode(words)[: self.prompt_tokens])
        return Prompt(max_tokens=self.output_tokens, text=text, prompt_tokens=len(self.tokenizer.encode(text)))

    def describe(self) -> dict[str, Any]:
        return {
            "source": "tokenizer" if self.tokenizer is not None else "synthetic",
            "tokenizer": None if self.tokenizer_path is None else str(self.tokenizer_path),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "seed": self.seed,
        }


class DatasetPrompts:
    """jsonl lines with ``prompt`` (a string) or ``messages`` (a chat), and an optional ``max_tokens``."""

    def __init__(self, path: Path, *, output_tokens: int, tokenizer: TextTokenizer | None = None) -> None:
        self.path = path
        self.output_tokens = output_tokens
        self.tokenizer = tokenizer
        self.prompts = [self._parse(number, line) for number, line in _lines(path)]
        if not self.prompts:
            raise InvalidArgument(
                f"--dataset {path} has no prompts; expected jsonl lines like "
                '{"prompt": "..."} or {"messages": [...], "max_tokens": 64}'
            )

    def _parse(self, number: int, line: str) -> Prompt:
        where = f"--dataset {self.path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{where} is not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise InvalidArgument(f"{where} is not a JSON object")
        max_tokens = row.get("max_tokens", self.output_tokens)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidArgument(f"{where}: max_tokens must be a positive integer, got {max_tokens!r}")
        if isinstance(row.get("prompt"), str):
            text = row["prompt"]
            count = None if self.tokenizer is None else len(self.tokenizer.encode(text))
            return Prompt(max_tokens=max_tokens, text=text, prompt_tokens=count)
        messages = row.get("messages")
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            return Prompt(max_tokens=max_tokens, messages=tuple(messages))
        raise InvalidArgument(f'{where} needs "prompt" (a string) or "messages" (a list of {{role, content}})')

    def prompt(self, step_index: int, request_index: int) -> Prompt:
        return self.prompts[request_index % len(self.prompts)]

    def describe(self) -> dict[str, Any]:
        return {
            "source": "dataset",
            "dataset": str(self.path),
            "prompts": len(self.prompts),
            "output_tokens": self.output_tokens,
        }

    @property
    def has_messages(self) -> bool:
        return any(p.messages is not None for p in self.prompts)


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read --dataset {path} ({exc.strerror or exc})") from exc
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
