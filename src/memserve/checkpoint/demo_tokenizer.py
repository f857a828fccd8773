"""A byte-level BPE tokenizer for demo checkpoints, trained here on local text only.

Demo models must load offline and decode every id, so the tokenizer is trained on the spot: a few KB
of English prose (``demo_corpus.txt``) plus pseudo-words built from syllables by a seeded
``random.Random``, which give the BPE trainer enough distinct pairs to reach 32k merges. The result
depends only on the target vocabulary size (never on the model seed), and the same ``tokenizers``
version gives the same vocabulary on every run. Special tokens follow Qwen's ChatML: ``<|endoftext|>``
pads, ``<|im_end|>`` ends a turn (the EOS), no BOS is added.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from memserve.errors import MemserveError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
"""ChatML, the format Qwen and many chat checkpoints use: one ``<|im_start|>role\\n...<|im_end|>\\n``
per message, and an open assistant turn when a generation prompt is asked for."""

_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "ck", "nd", "st", "ng")
_CORPUS_SEED = 0
_CORPUS_REPEATS = 20  # the prose outweighs the pseudo-words, so small vocabularies learn English first


def _prose() -> str:
    return resources.files("memserve.checkpoint").joinpath("demo_corpus.txt").read_text(encoding="utf-8")


def _pseudo_words(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct made-up words of one to four syllables, in a seeded, stable order."""
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice((1, 2, 2, 3, 3, 4))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _corpus(vocab_size: int) -> Iterator[str]:
    """The prose, then pseudo-words with Zipf-like counts: enough distinct pairs for ``vocab_size``."""
    prose = _prose()
    for _ in range(_CORPUS_REPEATS):
        yield prose
    lexicon = _pseudo_words(max(256, 2 * vocab_size), random.Random(_CORPUS_SEED))
    for rank, word in enumerate(lexicon, start=1):
        yield " ".join([word] * max(2, 1000 // rank))


@functools.lru_cache(maxsize=4)
def _trained_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(vocab_size), trainer=trainer)
    return tokenizer.to_str()


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A fresh byte-level BPE tokenizer with about ``vocab_size`` ids (specials included).

    Training is cached per size within a process (tests build the tiny model many times); a fresh
    object is returned each call so callers may change it freely.
    """
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_json(vocab_size))


def special_token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of one of ``SPECIAL_TOKENS``; the trainer always adds them, so a miss is a bug here."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise MemserveError(f"internal error: the demo tokenizer has no {token!r} token")
    return token_id


def save_tokenizer(tokenizer: Tokenizer, path: Path, *, model_max_length: int) -> int:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and the chat template into ``path``.

    Returns the vocabulary size as transformers sees it (``len(tokenizer)``), which is what the model
    config must use so that every id decodes.
    """
    from transformers import PreTrainedTokenizerFast  # heavy import, only when writing

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.save_pretrained(path)
    return len(hf_tokenizer)
