"""Small CLIP-compatible tokenizers built locally (no download), for tests, benchmarks and our own models."""

from __future__ import annotations

import json
import re
import string
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import CLIPTokenizer

CHARACTERS = string.ascii_lowercase + string.digits + ",.:;!?'-&/()"
_WORD = re.compile(r"[a-z]+")


def caption_words(captions: Iterable[str], min_count: int = 1) -> tuple[str, ...]:
    """The alphabetic words of ``captions`` (lower-cased) seen at least ``min_count`` times, sorted."""
    counts: dict[str, int] = {}
    for caption in captions:
        for word in _WORD.findall(caption.lower()):
            counts[word] = counts.get(word, 0) + 1
    return tuple(sorted(w for w, n in counts.items() if n >= min_count))


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merge loop on one word: repeatedly merge the lowest-ranked adjacent pair."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:], strict=False), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def build_char_clip_tokenizer(
    model_max_length: int = 77, characters: str = CHARACTERS, words: Sequence[str] = ()
) -> CLIPTokenizer:
    """A character-level ``CLIPTokenizer``, optionally with whole-word tokens for ``words``.

    Every character is one token (with and without the end-of-word marker).  Each word of ``words`` gets
    merges that join it into a single token; they are appended word by word after tokenizing the word
    with the merges so far, so a later word's merges (ranked after all earlier ones) never change an
    earlier word's result.  Other words fall back to characters.  Ids: characters, end-of-word
    characters, merge products in order, then ``<|startoftext|>`` and ``<|endoftext|>`` (which also
    pads); with no ``words`` this is the plain character tokenizer.
    """
    vocab: dict[str, int] = {}
    for c in characters:
        vocab[c] = len(vocab)
    for c in characters:
        vocab[c + "</w>"] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        if not word or any(c not in characters for c in word):
            raise ValueError(f"word {word!r} has characters outside the tokenizer's alphabet {characters!r}")
        pieces = _apply_bpe(word, ranks)
        merged = pieces[0]
        for piece in pieces[1:]:
            ranks[(merged, piece)] = len(ranks)
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = sorted(ranks, key=ranks.__getitem__)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)
