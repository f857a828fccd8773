"""How long a prompt can be in bytes before it is sure to overflow a context, without tokenizing it.

No token of a vocabulary stands for more bytes of text than the UTF-8 length of its longest piece
(byte-level BPE spells each byte as one character of one or two UTF-8 bytes; SentencePiece spells a
space as "▁", three bytes for one; byte-fallback pieces stand for one byte). So a text of more than
``context_tokens × longest_token_bytes`` bytes has more than ``context_tokens`` tokens, and can be
refused before a tokenizer spends memory on it. Torch-free: the gateway reads ``tokenizer.json``, the
runner its loaded tokenizer's vocabulary; both give the same number.

Between that bound and the context, the gateway counts with the checkpoint's own ``tokenizer.json`` (the
``tokenizers`` library, no transformers) before it would load a model for the request
(``prompt_tokens_at_least``): a prompt of 3,000 words for a 2,048-token context is refused at the door rather
than after a load that evicted another model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "longest_token_bytes",
    "max_prompt_bytes",
    "prompt_tokens_at_least",
    "tokenizer_file",
    "tokenizer_file_longest_token_bytes",
]

BOUNDARY_SLACK_TOKENS = 2
"""Tokens more taken off each text's bound for how its first and last words may join the template around it."""


def longest_token_bytes(pieces: Iterable[str]) -> int:
    """The UTF-8 length of the longest vocabulary piece (at least 1)."""
    return max((len(piece.encode("utf-8", "surrogatepass")) for piece in pieces), default=1) or 1


def max_prompt_bytes(context_tokens: int, longest_bytes: int) -> int:
    """Past this many bytes a text is sure to have more than ``context_tokens`` tokens."""
    return context_tokens * max(1, longest_bytes)


def tokenizer_file_longest_token_bytes(folder: Path) -> int | None:
    """``longest_token_bytes`` of ``folder/tokenizer.json``; None when there is no such file or it has no
    vocabulary we can read (then only the runner, after loading, bounds the prompt)."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = (data.get("model") or {}).get("vocab") if isinstance(data, dict) else None
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: piece → id
        pieces: list[str] = [p for p in vocab if isinstance(p, str)]
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        pieces = [p[0] for p in vocab if isinstance(p, list) and p and isinstance(p[0], str)]
    else:
        return None
    pieces += [
        t["content"]
        for t in data.get("added_tokens") or ()
        if isinstance(t, dict) and isinstance(t.get("content"), str)
    ]
    return longest_token_bytes(pieces) if pieces else None


def tokenizer_file(folder: Path) -> Any | None:
    """``folder/tokenizer.json`` as a ``tokenizers.Tokenizer`` (no transformers), None where there is none or it
    does not load (then only the runner, after loading, counts the prompt)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    except Exception:  # an older or newer format than this tokenizers reads: the runner counts instead
        return None


def prompt_tokens_at_least(tokenizer: Any, texts: Sequence[str]) -> int:
    """A lower bound on the tokens ``texts`` take in a prompt made of them with other text around each (a chat
    template's roles and markers), whatever that text is.

    A text's tokens inside a prompt are its own tokens, but near its two ends: tokenizers split at whitespace
    before they merge (a regex pre-tokenizer, or SentencePiece's words), so only its first and last words may
    merge with what the template puts next to them. Each text counts as its tokens less those of its first
    and last words and ``BOUNDARY_SLACK_TOKENS``; a template only adds to that.
    """

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    total = 0
    for text in texts:
        words = text.split()
        if not words:
            continue
        ends = count(words[0]) + (count(words[-1]) if len(words) > 1 else 0)
        total += max(0, count(text) - ends - BOUNDARY_SLACK_TOKENS)
    return total
