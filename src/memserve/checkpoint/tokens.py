"""How long a prompt can be in bytes before it is sure to overflow a context, without tokenizing it.

No token of a vocabulary stands for more bytes of text than the UTF-8 length of its longest piece
(byte-level BPE spells each byte as one character of one or two UTF-8 bytes; SentencePiece spells a
space as "▁", three bytes for one; byte-fallback pieces stand for one byte). So a text of more than
``context_tokens × longest_token_bytes`` bytes has more than ``context_tokens`` tokens, and can be
refused before a tokenizer spends memory on it. Torch-free: the gateway reads ``tokenizer.json``, the
runner its loaded tokenizer's vocabulary; both give the same number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

__all__ = ["longest_token_bytes", "max_prompt_bytes", "tokenizer_file_longest_token_bytes"]


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
