"""Small CLIP-compatible tokenizers built locally (no download), for tests, benchmarks and our own models."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

CHARACTERS = string.ascii_lowercase + string.digits + ",.:;!?'-&/()"


def build_char_clip_tokenizer(model_max_length: int = 77, characters: str = CHARACTERS) -> CLIPTokenizer:
    """A character-level ``CLIPTokenizer``: every character is one token (with and without the
    end-of-word marker), no BPE merges.  Ids: characters, then end-of-word characters, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (which also pads)."""
    vocab: dict[str, int] = {}
    for c in characters:
        vocab[c] = len(vocab)
    for c in characters:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)
