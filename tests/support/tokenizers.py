"""Tokenizers for tests, all built locally (no download).

* The tiny CLIP: a hand-made BPE ``CLIPTokenizer`` (``write_tiny_tokenizer``) and a random ``CLIPTextModel``
  (``make_tiny_clip``) written to disk in the transformers layout.  The vocabulary mimics OpenAI CLIP's
  ordering at a small scale: single characters, the same characters with the end-of-word marker ``</w>``,
  then the merged tokens of ``WORDS``, and ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids.
  Words are split by CLIP's BPE over those merges (``bpe``), so most words of ``WORDS`` are one token and
  other words fall back to smaller pieces.
* The authors' BPE file (``write_authors_bpe``): OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` layout.
* ``build_char_clip_tokenizer`` (the character tokenizer of our own trained models) is
  :func:`vqdiffusion.text_vocab.build_char_clip_tokenizer`, re-exported here.
"""

from __future__ import annotations

import gzip
import json
import string
from pathlib import Path

import torch

from vqdiffusion.text_vocab import _apply_bpe, build_char_clip_tokenizer

__all__ = [
    "BOS",
    "CHARACTERS",
    "EOS",
    "WORDS",
    "bpe",
    "build_char_clip_tokenizer",
    "expected_ids",
    "make_tiny_clip",
    "tiny_clip_vocab",
    "word_pieces",
    "write_authors_bpe",
    "write_tiny_tokenizer",
]

CHARACTERS = string.ascii_lowercase + string.digits + ",.!?'-"
WORDS = ("a", "an", "the", "red", "blue", "green", "cat", "dog", "photo", "of", "on", "sitting", "table", "bird")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def word_pieces(word: str) -> list[str]:
    """The BPE symbols a word starts from: its characters, the last one with ``</w>``."""
    return [*word[:-1], word[-1] + "</w>"]


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the tiny tokenizer.  Each word of ``WORDS`` is merged left to right."""
    tokens = list(CHARACTERS) + [c + "</w>" for c in CHARACTERS]
    merges: list[str] = []
    for word in WORDS:
        pieces = word_pieces(word)
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            merged += piece
            if rule not in merges:
                merges.append(rule)
                tokens.append(merged)
    tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def bpe(word: str, merges: list[str]) -> list[str]:
    """CLIP's BPE of one word over ``merges`` (rules "a b", first = highest priority)."""
    return _apply_bpe(word, {tuple(rule.split()): i for i, rule in enumerate(merges)})


def expected_ids(prompt: str) -> list[int]:
    """Hand tokenisation (BOS, BPE pieces, EOS; no padding) of a prompt of lower-case letter words."""
    vocab, merges = tiny_clip_vocab()
    ids = [vocab[BOS]]
    for word in prompt.lower().split():
        if not word.isalpha():
            raise ValueError(f"expected_ids handles letter-only words, got {word!r}")
        ids += [vocab[piece] for piece in bpe(word, merges)]
    return ids + [vocab[EOS]]


def write_tiny_tokenizer(tokenizer_dir: Path, model_max_length: int = 77) -> Path:
    """Write vocab.json + merges.txt, then let ``CLIPTokenizer`` add its own files (tokenizer.json,
    tokenizer_config.json with ``model_max_length``).  Returns ``tokenizer_dir``."""
    from transformers import CLIPTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(tokenizer_dir / "vocab.json"),
        merges=str(tokenizer_dir / "merges.txt"),
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(str(tokenizer_dir))
    return tokenizer_dir


def make_tiny_clip(
    tmp_dir: str | Path,
    hidden_size: int = 32,
    *,
    num_layers: int = 2,
    num_heads: int = 2,
    max_length: int = 77,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a random ``CLIPTextModel`` (safetensors) and the tiny tokenizer under ``tmp_dir``.

    Returns ``(text_encoder_dir, tokenizer_dir)`` = ``(tmp_dir/"text_encoder", tmp_dir/"tokenizer")``,
    loadable with ``from_pretrained(..., local_files_only=True)``.  Same ``seed`` -> same weights.
    """
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as hf_logging

    root = Path(tmp_dir)
    tokenizer_dir = write_tiny_tokenizer(root / "tokenizer", model_max_length=max_length)
    vocab, _ = tiny_clip_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    # Random layer-norm affine parameters too, so that nothing in the check is the identity.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    text_encoder_dir = root / "text_encoder"
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in test output
    try:
        model.save_pretrained(str(text_encoder_dir), safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    return text_encoder_dir, tokenizer_dir


def write_authors_bpe(path: Path, merges: list[str]) -> Path:
    """A tiny ``bpe_simple_vocab_16e6.txt.gz`` (the authors' / OpenAI's tokenizer file): a header line, then
    ``merges``."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(['"bpe_simple_vocab_16e6.txt#version: 0.2', *merges]) + "\n")
    return path
